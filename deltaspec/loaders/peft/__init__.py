"""PEFT adapters, one module per method (``peft_type``): LoRA (:mod:`.lora`, with its config rules
:mod:`.config` and key names :mod:`.keys`), AdaLoRA, VeRA, LoHa, LoKr, IA³, OFT, BOFT, FourierFT;
what they share (the open adapter, the key grouper: :mod:`.common`; modules_to_save and trainable
tokens: :mod:`.extras`). :mod:`.config` and :mod:`.keys` import no torch.
"""
