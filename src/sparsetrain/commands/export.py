"""``sparsetrain export RUN_DIR``: the trained sparse model as a plain masked ``state_dict`` and a compressed file.

A training checkpoint holds the dense, unmasked weights; a plain model loaded from it predicts differently from the
trained sparse model. ``export`` re-applies the run's recipe with its saved sparsity state, takes every sparse
layer's forward weight (:func:`sparsetrain.export.masked_state_dict`) and writes

* ``RunDir.SPARSE_MODEL`` in the run directory (``--out``): a ``torch.save`` of the plain ``state_dict``; it loads
  into the vanilla model (``create_model(...).load_state_dict(torch.load(f))``) and reproduces the sparse model's
  predictions;
* ``RunDir.COMPRESSED_MODEL`` (``--compressed-out``): the same tensors packed (values + bitmap or indices),
  read back with :func:`sparsetrain.export.load_compressed`,

and prints their sizes beside the dense checkpoint's weights.

Examples:
    sparsetrain export runs/lenet5-swat-u
    sparsetrain export runs/lenet5-swat-u --out lenet5_sparse.pt --compressed-out lenet5_sparse.packed.pt
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

__all__ = ["HELP", "add_arguments", "main", "export_run"]

HELP = "write a run's sparse model: a plain state_dict with the masks applied, and a compressed file"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``export`` arguments."""
    parser.add_argument("run", metavar="RUN_DIR", help="run directory written by `sparsetrain train`")
    from sparsetrain.runs import RunDir

    parser.add_argument("--out", metavar="FILE", default=None,
                        help=f"plain masked state_dict (default RUN_DIR/{RunDir.SPARSE_MODEL})")
    parser.add_argument("--compressed-out", metavar="FILE", default=None,
                        help=f"compressed file (default RUN_DIR/{RunDir.COMPRESSED_MODEL})")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def export_run(run: str | Path, out: str | Path | None = None, compressed_out: str | Path | None = None, *,
               force: bool = False) -> dict[str, object]:
    """Export a run's sparse model; returns the paths and sizes in bytes (see the module docstring).

    Raises:
        RunDirectoryError: not a run directory.
        FileNotFoundError, RuntimeError: the checkpoint is missing or damaged.
        FileExistsError: an output exists (and not ``force``), or is a folder.
    """
    import torch

    from sparsetrain.export import masked_state_dict, save_compressed
    from sparsetrain.files import atomic_write_bytes
    from sparsetrain.runs import RunDir, load_run

    run_dir = RunDir(run)
    run_dir.check()
    out_path = Path(out) if out is not None else run_dir.sparse_model_path
    packed_path = Path(compressed_out) if compressed_out is not None else run_dir.compressed_model_path
    if out_path.resolve() == packed_path.resolve():
        raise ValueError(f"--out and --compressed-out name the same file {out_path}; give two names")
    for p in (out_path, packed_path):
        if p.is_dir():
            raise FileExistsError(f"{p} is a folder; name a file")
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists; add --force to overwrite it")
        if not p.parent.is_dir():
            raise FileNotFoundError(f"folder {p.parent} of {p} does not exist")
    loaded = load_run(run_dir.path)
    handle = loaded.sparsify()
    lost = [name for name, spec in handle.layers.items() if spec.input is not None or spec.output is not None]
    if lost:
        logger.warning("the run's recipe also sparsifies forward activations of %s: not a weight, so not in the "
                       "exported state_dict", ", ".join(lost))
    exported = masked_state_dict(handle.model)
    buf = io.BytesIO()
    torch.save(exported, buf)
    atomic_write_bytes(out_path, buf.getvalue())
    sizes = save_compressed(exported, packed_path)
    dense_buf = io.BytesIO()
    torch.save(loaded.checkpoint["model"], dense_buf)  # the dense weights alone, as the same torch.save
    return {"state_dict_path": str(out_path), "state_dict_bytes": out_path.stat().st_size,
            "compressed_path": str(packed_path), "compressed_bytes": sizes["bytes"],
            "dense_bytes": len(dense_buf.getbuffer()), "checkpoint_path": str(run_dir.checkpoint_path),
            "checkpoint_bytes": run_dir.checkpoint_path.stat().st_size}


def main(args: argparse.Namespace) -> int:
    """Export and print the three sizes; 0, or 2 (printed by the CLI) for a bad run directory or output path."""
    r = export_run(args.run, args.out, args.compressed_out, force=args.force)
    dense = int(r["dense_bytes"])  # type: ignore[arg-type]
    rows = [
        ("dense weights (as in the checkpoint)", dense, "-"),
        (f"masked state_dict  {r['state_dict_path']}", r["state_dict_bytes"], "loads into the vanilla model"),
        (f"compressed         {r['compressed_path']}", r["compressed_bytes"],
         f"{dense / max(1, int(r['compressed_bytes'])):.2f}x smaller; sparsetrain.export.load_compressed"),
    ]
    w = max(len(name) for name, _, _ in rows)
    print(f"sparsetrain export: {args.run}")
    for name, size, note in rows:
        print(f"  {name:<{w}}  {_human(int(size)):>10}  {note}")
    print(f"  (the checkpoint {r['checkpoint_path']} also holds the optimizer and RNG state: "
          f"{_human(int(r['checkpoint_bytes']))})")
    return 0
