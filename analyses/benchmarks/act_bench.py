"""compress / extract beside their peers, on the same files and CPU, in one run.

1. ``compress`` of the 224-module r64 LoRA (7B shapes, bf16; slice7b.build_lora) at τ = 0.95:
   deltaspec's CLI end to end (target ≤ 5 s).
2. PEFT 0.21 ``convert_to_lora`` at the same τ on the first ``--peft-layers`` layers of the same
   adapter saved in float32 (PEFT rounds ΔW to the adapter's dtype before its SVD, so a bf16
   adapter cannot give PEFT the exact ΔW), against ``deltaspec.compress`` on the same folder:
   the same rank_pattern, the same ΔW_k (‖ΔW_k^PEFT − ΔW_k^deltaspec‖_F/‖ΔW_k‖_F), wall time.
   PEFT needs a model: its LoRA layers are built on a base of ``nn.Linear`` whose weights are
   one broadcast zero (no memory; ``convert_to_lora`` reads only the LoRA factors).
3. ``extract`` of the 7B-shaped full fine-tune slice (slice7b.build_full, bf16) at equal rank
   against ``mergekit-extract-lora --max-rank K`` (run from a private venv: ``--mergekit``):
   wall time and peak RSS of each as a child process, and the error of each output,
   ‖ΔW − B·A‖_F/‖ΔW‖_F, computed here in float64 from the files (mergekit reports none).

    nice -n 10 python analyses/benchmarks/act_bench.py /tmp/act-bench \\
        --mergekit /tmp/venv-mergekit/bin/mergekit-extract-lora
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slice7b  # noqa: E402
from bench import machine  # noqa: E402

F64 = torch.float64


def child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB of this child alone, stderr) of a command run as a child process."""
    with tempfile.TemporaryFile("w+") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {err.strip().splitlines()[-3:]}")
    return wall, usage.ru_maxrss / 1024, err


def fro_error(dw: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖ΔW − B·A‖_F/‖ΔW‖_F in float64, by row blocks."""
    num, den = 0.0, float(dw.double().norm()) ** 2
    b, a = b.double(), a.double()
    for lo in range(0, dw.shape[0], 1024):
        num += float((dw[lo:lo + 1024].double() - b[lo:lo + 1024] @ a).square().sum())
    return (num / den) ** 0.5


def factor_gap(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖B₁A₁ − B₂A₂‖_F/‖B₂A₂‖_F from the factors (QR of the stacked factors; no dense ΔW)."""
    def norm(b: torch.Tensor, a: torch.Tensor) -> float:
        rb, ra = torch.linalg.qr(b.double(), mode="r")[1], torch.linalg.qr(a.double().T, mode="r")[1]
        return float(torch.linalg.matrix_norm(rb @ ra.T))

    return norm(torch.cat([x[0], -y[0]], 1), torch.cat([x[1], y[1]], 0)) / norm(*y)


def adapter_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (B·s, A) of a PEFT LoRA folder (s = α/r per module, rank/alpha patterns read)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key in sd:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = sd[key], sd[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"])
            out[name] = (b.double() * (alpha / r), a.double())
    return out


def bench_compress(root: Path, tau: float) -> dict:
    lora = slice7b.build_lora(root / "r64", 32, r=64)
    out = root / "compressed"
    cmd = [sys.executable, "-m", "deltaspec", "compress", str(lora), "--rank", str(tau),
           "--out", str(out), "--overwrite", "-q", "--format", "csv"]
    wall, rss, _ = child(cmd)
    return {"what": "deltaspec compress (CLI), 224 modules r64 → τ", "wall": wall, "rss": rss}


def _peft_model(adapter: Path) -> torch.nn.Module:
    from peft import PeftConfig, PeftModel

    names = sorted({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    for k in load_file(str(adapter / "adapter_model.safetensors"))
                    if k.endswith("lora_A.weight")})
    root = torch.nn.Module()
    for name in names:
        m, n = slice7b.MODULES[name.split(".", 3)[3]]
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        layer = torch.nn.Linear(n, m, bias=False, device="meta")
        layer.weight = torch.nn.Parameter(torch.zeros(()).expand(m, n), requires_grad=False)
        parent.add_module(name.split(".")[-1], layer)
    config = PeftConfig.from_pretrained(adapter)
    config.task_type = None  # a bare module tree: no generation head to wrap
    return PeftModel.from_pretrained(root, adapter, config=config)


def bench_peft(root: Path, tau: float, layers: int, modules: str) -> list[dict]:
    from peft.tuners.lora.conversion import convert_to_lora

    import deltaspec

    src = slice7b.build_lora(root / "r64", 32, r=64)
    f32 = root / f"r64-f32-{layers}-{re.sub(r'[^a-z_]', '', modules)}"
    if not (f32 / "adapter_model.safetensors").is_file():
        f32.mkdir(parents=True, exist_ok=True)
        sd = load_file(str(src / "adapter_model.safetensors"))
        keep = {k: v.float() for k, v in sd.items()
                if int(k.split(".")[4]) < layers and re.search(modules, k)}
        save_file(keep, str(f32 / "adapter_model.safetensors"))
        (f32 / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    t0 = time.perf_counter()
    df = deltaspec.compress(f32, rank=tau, out=root / "ours-f32", overwrite=True)
    ours_wall = time.perf_counter() - t0
    model = _peft_model(f32)
    t0 = time.perf_counter()
    cfg, sd = convert_to_lora(model, rank=tau)
    peft_wall = time.perf_counter() - t0
    ours = adapter_factors(root / "ours-f32")
    same_ranks = dict(zip(df["module"], df["rank"], strict=True)) == dict(cfg.rank_pattern)
    gaps = [factor_gap((sd[f"base_model.model.{n}.lora_B.weight"],
                        sd[f"base_model.model.{n}.lora_A.weight"]), ours[n]) for n in ours]
    note = f"same rank_pattern: {same_ranks}; max ‖ΔW_k(PEFT) − ΔW_k(ours)‖/‖ΔW_k‖ {max(gaps):.1e}"
    return [{"what": f"deltaspec.compress, {len(df)} modules (float32 r64), τ = {tau}",
             "wall": ours_wall, "note": note},
            {"what": f"PEFT convert_to_lora, the same {len(df)} modules", "wall": peft_wall,
             "note": note}]


def bench_extract(root: Path, rank: int, mergekit: str | None, modules: str) -> list[dict]:
    base, full = slice7b.build_full(root, 1)
    rows = []
    ours = root / "extracted"
    wall, rss, _ = child([sys.executable, "-m", "deltaspec", "extract", str(full), "--base",
                          str(base), "--rank", str(rank), "--out", str(ours), "--overwrite", "-q",
                          "--format", "csv", "--include", modules])
    rows.append({"what": f"deltaspec extract --rank {rank} (CLI)", "wall": wall, "rss": rss,
                 "error": _errors(base, full, adapter_factors(ours), modules)})
    if mergekit:
        out = root / "mergekit"
        wall, rss, _ = child([mergekit, "--model", str(full), "--base-model", str(base),
                              "--out-path", str(out), "--max-rank", str(rank),
                              "--no-copy-tokenizer", "--skip-undecomposable", "-e",
                              "embed_tokens|lm_head", "-i",
                              rf"layers\.\d+\.(self_attn|mlp)\.({modules})"])
        rows.append({"what": f"mergekit-extract-lora --max-rank {rank}", "wall": wall, "rss": rss,
                     "error": _errors(base, full, adapter_factors(out), modules)})
    return rows


def _errors(base: Path, full: Path, factors: dict, modules: str) -> float:
    """The largest ‖ΔW − B·A‖_F/‖ΔW‖_F over the modules (float64, from the files)."""
    worst = 0.0
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    for key, shard in index.items():
        if not re.search(modules, key):
            continue
        name = key.removesuffix(".weight")
        w1 = load_file(str(full / shard))[key]
        w0 = load_file(str(base / shard))[key]
        dw = w1.double() - w0.double()
        worst = max(worst, fro_error(dw, *factors[name]))
    return worst


def table(rows: list[dict]) -> str:
    lines = ["| run | wall (s) | peak RSS (MiB) | max rel. error | note |", "|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['rss']:.0f}" if r.get("rss") else "–"
        err = f"{r['error']:.4g}" if r.get("error") is not None else "–"
        lines.append(f"| {r['what']} | {r['wall']:.2f} | {rss} | {err} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--rank", type=int, default=16, help="extract: the equal rank")
    ap.add_argument("--peft-layers", type=int, default=1)
    ap.add_argument("--modules", default="q_proj|down_proj",
                    help="regex: the modules PEFT and mergekit get (their full SVDs are slow)")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-extract-lora")
    ap.add_argument("--skip", default="", help="comma list of compress,peft,extract")
    ap.add_argument("--small", action="store_true", help="small stand-in shapes (a dry run)")
    a = ap.parse_args()
    if a.small:
        slice7b.shrink()
    torch.set_grad_enabled(False)
    rows: list[dict] = []
    skip = set(a.skip.split(","))
    if "compress" not in skip:
        rows.append(bench_compress(a.root, a.tau))
    if "peft" not in skip:
        rows += bench_peft(a.root, a.tau, a.peft_layers, a.modules)
    if "extract" not in skip:
        rows += bench_extract(a.root, a.rank, a.mergekit, a.modules)
    print(f"CPU: {machine()}, torch {torch.__version__}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
