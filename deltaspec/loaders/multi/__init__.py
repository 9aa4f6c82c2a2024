"""Updates made of several LoRA parts: MultiLoRA (:mod:`.multilora`), the MTL-LoRA code base's
checkpoints (:mod:`.mtl_lora`, MoELoRA in :mod:`.mtl_tasks`) and mixtures of LoRA experts
(MixLoRA :mod:`.mixlora`, HydraLoRA/LoRAMoE :mod:`.lora_moe`, shared helpers :mod:`.moe`).
"""
