"""Regenerate the CI example and show `deltaspec check` on changed recipes.

    python analyses/ci-example/make_example.py [--work DIR] [--update]

Trains the bundled reference model (quick mode, about 2 minutes on 2 CPU cores): the base, the
rank-16 LoRA of the example recipe (seed 0), and three variants of it — the same recipe reseeded
(seed 1), a 10× learning rate, and the seed-0 adapter with the top singular direction of every
q_proj scaled up 10× (an update collapsing onto one direction). Then runs `deltaspec check` on
each against the baseline with rules.toml and prints the results. With --update it first copies
the seed-0 adapter to adapter/ and snapshots it into baseline.json (the committed files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
WEIGHTS = "adapter_model.safetensors"


def train(work: Path) -> dict[str, Path]:
    """The base, the seed-0 LoRA and the reseeded / 10×-lr variants under ``work``."""
    from deltaspec.reference import default_train_config, finetune, run_all

    if not (work / "lora" / WEIGHTS).is_file():
        run_all(work, quick=True, seed=0, methods=("lora",))
    tcfg = default_train_config("lora", True, 0)
    variants = {"reseeded": ({"seed": 1}, 1), "lr10": ({"lr": tcfg.lr * 10}, 0)}
    out = {"lora": work / "lora"}
    for name, (change, seed) in variants.items():
        folder = work / f"lora_{name}"
        if not (folder / WEIGHTS).is_file():
            cfg = replace(default_train_config("lora", True, seed), **change)
            finetune("lora", work / "base", folder, train_config=cfg, quick=True, seed=seed)
        out[name] = folder
    return out


def collapse(src: Path, dst: Path, factor: float = 10.0) -> Path:
    """A copy of ``src`` whose q_proj updates have σ₁ scaled by ``factor`` (same directions)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    t = load_file(str(src / WEIGHTS))
    cfg = json.loads((src / "adapter_config.json").read_text())
    for key in [k for k in t if k.endswith("q_proj.lora_B.weight")]:
        b, a = t[key].double(), t[key.replace("lora_B", "lora_A")].double()
        u, s, vh = torch.linalg.svd(b @ a)
        b = b + (factor - 1) * s[0] * torch.outer(u[:, 0], vh[0] @ torch.linalg.pinv(a))
        t[key] = b.to(t[key].dtype)
    save_file({k: v.contiguous() for k, v in t.items()}, str(dst / WEIGHTS),
              metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def update_committed(adapter: Path) -> None:
    """Copy the adapter into adapter/ and snapshot it into baseline.json."""
    target = HERE / "adapter"
    target.mkdir(exist_ok=True)
    shutil.copyfile(adapter / WEIGHTS, target / WEIGHTS)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "deltaspec-reference-base (quick)"
    (target / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    subprocess.run(["deltaspec", "snapshot", "adapter", "--out", "baseline.json", "-q"],
                   cwd=HERE, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/deltaspec-ci-example", help="Training folder.")
    ap.add_argument("--update", action="store_true", help="Rewrite adapter/ and baseline.json.")
    args = ap.parse_args()
    work = Path(args.work)
    runs = train(work)
    runs["collapsed"] = collapse(runs["lora"], work / "lora_collapsed")
    if args.update:
        update_committed(runs["lora"])
    for name in ("lora", "reseeded", "lr10", "collapsed"):
        cmd = ["deltaspec", "check", str(runs[name]), "--baseline", "baseline.json",
               "--rules", "rules.toml", "-q"]
        r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        print(f"$ deltaspec check {runs[name]} --baseline baseline.json --rules rules.toml")
        print(r.stdout.rstrip() or r.stderr.rstrip())
        print(f"(exit status {r.returncode})\n")


if __name__ == "__main__":
    main()
