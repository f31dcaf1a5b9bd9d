"""Share NAtS-L checkpoints: a hub-ready folder and the upload (CLI `natsl-hub`).

- `save_for_hub` writes what a hub repository needs: safetensors weights, config.json with
  `auto_map`, the remote-code modules (all three by `NatslForCausalLM.save_pretrained`), the
  tokenizer, README.md (natsl_hf/model_card.py) and the metrics behind it (natsl_hf/metrics.py).
- `push_to_hub` uploads such a folder with `HfApi.create_repo` + `upload_folder` (token from
  the argument, `HF_TOKEN` or the `hf auth login` store); `dry_run=True` lists and uploads
  nothing. Failures are re-raised as RuntimeError naming the endpoint and the fix.
- CLI: `natsl-hub MODEL_DIR --repo-id ID [--out DIR] [--dry-run] [--overwrite] [--metrics JSON ...]`.
  The folder is written to `--out`; without it a dry run writes `<MODEL_DIR>-hub` beside the
  checkpoint (kept, so it can be inspected) and an upload stages in a temporary folder removed
  afterwards. An existing non-empty output folder is refused unless `--overwrite`, which replaces
  it only when an earlier natsl-hub run wrote it (its `.natsl-hub` marker), never a checkpoint.
  The card keeps the checkpoint's provenance (`card_provenance`: base model, license, conversion
  command, training) and its metrics file, then the `--metrics` files, merged. The folder is written
  atomically (conversion/output.py: a temp folder renamed into place), its files with the umask's mode;
  Ctrl-C is one line, exit status 130. Paths and the checkpoint's model_type are checked before torch is
  imported, so a typo is refused at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .conversion.output import file_stamps, honour_umask, write_atomically
from .conversion.sources import OneLineArgumentParser, check_input_path, conversion_advice, read_model_type
from .metrics import METRICS_FILE, load_metrics
from .model_card import NOT_MEASURED, card_provenance, render_model_card

HUB_MARKER = ".natsl-hub"  # marks a folder natsl-hub wrote (never uploaded: dot files are skipped)


# --------------------------------------------------------------------------- folder + upload
def save_for_hub(model, out_dir, tokenizer=None, **card_kwargs) -> Path:
    """Write a hub-ready folder: safetensors, config.json (auto_map), remote-code modules,
    tokenizer (when given) and README.md rendered by `render_model_card(model, **card_kwargs)`.
    Returns the folder."""
    out = Path(out_dir)
    card = render_model_card(model, **card_kwargs)  # render first: a bad metrics dict writes nothing
    out.mkdir(parents=True, exist_ok=True)
    before = file_stamps(out)
    model.save_pretrained(out, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
    if card_kwargs.get("metrics"):
        (out / METRICS_FILE).write_text(json.dumps(card_kwargs["metrics"], indent=2) + "\n", encoding="utf-8")
    honour_umask(out, before)  # model.safetensors would be 0o600 (safetensors writes it through a temp file)
    return out


def _upload_files(folder: Path) -> list[tuple[str, int]]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def push_to_hub(
    folder,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload NAtS-L checkpoint (natsl-hf)",
) -> list[str] | str:
    """Upload `folder` to the model repo `repo_id` (created if missing).

    token: None uses huggingface_hub's usual sources (HF_TOKEN, then the `hf auth login` store).
    dry_run: print the files that would be uploaded and return their names; contacts nothing.
    endpoint: a hub endpoint other than huggingface.co (default: HF_ENDPOINT or huggingface.co).
    Returns the commit URL of the upload (or the file list for a dry run). Raises RuntimeError
    naming the endpoint and the fix when the hub cannot be reached or refuses the token.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; write the folder with save_for_hub() or natsl-hub --out first.")
    files = _upload_files(folder)
    if dry_run:
        total = sum(size for _, size in files)
        print(f"[dry run] would upload {len(files)} files ({total / 1e6:.2f} MB) from {folder} to {repo_id} "
              f"({'private' if private else 'public'}):")
        for name, size in files:
            print(f"  {name}  ({size:,} bytes)")
        return [name for name, _ in files]

    from huggingface_hub import HfApi, constants

    target = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=[".*", "__pycache__/*"],
        )
    except Exception as err:  # network, auth and hub errors all get the same actionable wrapper
        raise RuntimeError(
            f"Uploading {folder} to {repo_id!r} on {target} failed: {type(err).__name__}: {err}. "
            "Check that the endpoint is reachable (--endpoint / HF_ENDPOINT), that HF_HUB_OFFLINE is not set, and "
            "that a token with write access is available (--token, HF_TOKEN, or `hf auth login`)."
        ) from err
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="natsl-hub",
        description="Write a hub-ready folder for a NAtS-L checkpoint (weights, auto_map config, remote code, "
        "tokenizer, model card) and upload it.",
    )
    p.add_argument("model_dir", help="a NAtS-L checkpoint directory (save_pretrained / natsl-convert output)")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. user/SmolLM2-135M-NAtS-L")
    p.add_argument("--out", help="write the hub folder here and keep it (default: with --dry-run, MODEL_DIR-hub beside "
                   "the checkpoint; otherwise a temporary folder removed after the upload)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the hub folder (to --out or MODEL_DIR-hub), list the files that would be uploaded; "
                   "upload nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder, only one an earlier natsl-hub run wrote (marked "
                   f"{HUB_MARKER}); without it a non-empty output folder is refused")
    p.add_argument("--metrics", nargs="+", default=[], metavar="JSON",
                   help=f"metrics JSON files for the card, merged after MODEL_DIR/{METRICS_FILE} if present; "
                   "bench/eval_quality.py and bench/decode_bench.py reports are recognised (a decode report must "
                   "have been run on this checkpoint's shape: bench/decode_bench.py --model MODEL_DIR)")
    p.add_argument("--label", help="model label to take from a bench/eval_quality.py report (if it has several)")
    p.add_argument("--base-model", help="hub id of the source model (card metadata)")
    p.add_argument("--license", help="license id of the source model, e.g. apache-2.0")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the `hf auth login` store)")
    p.add_argument("--endpoint", help="hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    return p


def _check_out(out: Path, model_dir: Path, overwrite: bool) -> str | None:
    """Why `out` must not receive the hub folder (None: it may; --overwrite then replaces it)."""
    target, model = out.resolve(), model_dir.resolve()
    if target == model or target in model.parents:
        return f"the output folder {out} is (or contains) the checkpoint {model_dir}; pick another --out."
    if target.exists() and not target.is_dir():
        return f"the output path {out} exists and is not a folder; pick another --out."
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            return (f"the output folder {out} already exists and is not empty; pass --overwrite to replace it, "
                    "or pick another --out.")
        if not (target / HUB_MARKER).is_file():
            return (f"--overwrite only replaces a folder an earlier natsl-hub run wrote (it holds {HUB_MARKER}), and "
                    f"{out} is not one (a checkpoint, perhaps); remove it yourself or pick another --out.")
    return None


def _fail(message: str, status: int = 2) -> int:
    print(f"natsl-hub: error: {message}", file=sys.stderr)
    return status


def _check_natsl(model_dir: Path) -> None:
    """Refuse a `model_dir` that is no NAtS-L checkpoint (read as JSON, before torch is imported); ValueError
    naming the fix: convert it, when natsl-convert supports its family, else which families it supports."""
    check_input_path(model_dir, "MODEL_DIR")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json (expected a NAtS-L checkpoint directory).")
    try:
        model_type = read_model_type(model_dir)
    except (OSError, ValueError) as err:  # unreadable or invalid JSON
        raise ValueError(f"Cannot read {model_dir / 'config.json'}: {err}") from err
    if model_type != "natsl":
        advice = conversion_advice(model_dir, model_type)
        then = " and publish OUT" if advice.startswith("convert") else ""
        raise ValueError(f"{model_dir} holds a {model_type!r} checkpoint, not a NAtS-L one; {advice}{then}.")


def _read_config(model_dir: Path):
    """The NatslConfig of the checkpoint in `model_dir`; ValueError naming the fix for anything else."""
    _check_natsl(model_dir)
    from .configuration_natsl import NatslConfig

    return NatslConfig.from_pretrained(model_dir)


def _default_out(args, model_dir: Path) -> Path | None:
    if args.out:
        return Path(args.out)
    if args.dry_run:  # a dry run exists to be inspected: keep the folder beside the checkpoint
        return model_dir.resolve().parent / f"{model_dir.resolve().name}-hub"
    return None  # an upload stages in a temporary folder


def _write_folder(out: Path, model, tokenizer, card_kwargs) -> None:
    save_for_hub(model, out, tokenizer=tokenizer, **card_kwargs)
    (out / HUB_MARKER).write_text("written by natsl-hub; --overwrite may replace this folder\n", encoding="utf-8")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    out = _default_out(args, model_dir)
    staging = None
    written = uploading = False
    try:
        try:
            _check_natsl(model_dir)  # before torch is imported
            for path in args.metrics:
                check_input_path(path, "--metrics", directory=False)
            problem = None if out is None else _check_out(out, model_dir, args.overwrite)
            if problem:
                raise ValueError(problem)
            config = _read_config(model_dir)
            own = [model_dir / METRICS_FILE] if (model_dir / METRICS_FILE).is_file() else []
            metrics = load_metrics(own + list(args.metrics), label=args.label, config=config, model_dir=str(model_dir))
            known = card_provenance(model_dir)
            card_kwargs = dict(
                base_model=args.base_model or known["base_model"],
                license=args.license or known["license"],
                conversion_command=known["conversion_command"],
                metrics=metrics,
                repo_id=args.repo_id,
            )
            render_model_card(config, **card_kwargs)  # a card that cannot render leaves an existing folder alone
        except (ValueError, OSError) as err:
            return _fail(" ".join(str(err).split()))

        from . import _load
        from .modeling_natsl import NatslForCausalLM

        _load()  # AutoTokenizer reads the checkpoint's config: "natsl" must be registered
        model = NatslForCausalLM.from_pretrained(model_dir)
        tokenizer = None
        if any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            if out is None:  # an upload stages in a temporary folder
                out = Path(staging := tempfile.mkdtemp(prefix="natsl-hub-"))
                _write_folder(out, model, tokenizer, card_kwargs)
            else:  # replaces an earlier natsl-hub folder (checked by _check_out) only once the new one is complete
                write_atomically(out, lambda tmp: _write_folder(tmp, model, tokenizer, card_kwargs))
            written, uploading = staging is None, not args.dry_run
            result = push_to_hub(
                out, args.repo_id, token=args.token, private=args.private, dry_run=args.dry_run, endpoint=args.endpoint
            )
        except RuntimeError as err:  # the upload failed: not a bad input, status 1
            return _fail(str(err), status=1)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    except KeyboardInterrupt:
        if uploading:
            kept = f"; the hub folder {out} is complete" if written else ""
            note = f"the upload to {args.repo_id} was cut short (check the repository, and run again to upload){kept}"
        elif written:
            note = f"the hub folder {out} is complete; nothing was uploaded"
        else:
            note = "nothing was written" + (f" ({out} is as it was)" if out is not None and staging is None
                                            and out.exists() else "")
        print(f"natsl-hub: interrupted; {note}", file=sys.stderr)
        return 130
    if args.dry_run:
        print(f"hub folder written to {out} (nothing uploaded; run again without --dry-run to upload)")
    else:
        print(f"uploaded {out} to {args.repo_id}: {result}")
    return 0


__all__ = ["METRICS_FILE", "NOT_MEASURED", "build_parser", "card_provenance", "load_metrics", "main", "push_to_hub",
           "render_model_card", "save_for_hub"]

if __name__ == "__main__":
    sys.exit(main())
