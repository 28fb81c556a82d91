"""`i2v-daemon inspect FILE [--json] [--sidecar]`: a video's recipe and provenance, from the file alone.

The recipe comes from whichever copy survived (XMP box, the stream's SEI, the comment tag:
work/recipe.py); the provenance is the C2PA manifest as c2pa-python's Reader validates it, its
signer checked against a trust anchor: `--trust FILE`, else this daemon's own certificate.
Exit 0 when something was found and nothing in it failed validation; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.logs import terminal_json, terminal_safe

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

EX_OK, EX_FAILED = 0, 1


def add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("inspect", parents=[common], help="a video's recipe and provenance (C2PA signer, trust, label)")
    p.add_argument("file", metavar="FILE", help="an mp4 (or poster) made by i2v-daemon, or any file to check")
    p.add_argument("--json", action="store_true", help="one JSON object: file, recipe, recipe_source, provenance")
    p.add_argument("--sidecar", action="store_true",
                   help="print a sidecar (.json) that makes the same job again from the same image")
    p.add_argument("--trust", metavar="PEM", help="trust anchors (PEM) to check the signer against")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from i2v_daemon.work import provenance, recipe

    path = Path(args.file)
    if not path.is_file():
        print(terminal_safe(f"i2v-daemon: {args.file}: no such file"), file=sys.stderr)
        return EX_FAILED
    try:
        made, source = recipe.read(path) if path.suffix.lower() in (".mp4", ".m4v", ".mov") else (None, None)
    except OSError as err:
        print(terminal_safe(f"i2v-daemon: {args.file}: cannot read it: {err.strerror}"), file=sys.stderr)
        return EX_FAILED
    try:
        anchors, anchor_source = _anchors(args.trust, settings)
    except OSError as err:
        print(terminal_safe(f"i2v-daemon: --trust {args.trust}: {err.strerror}; give a PEM file of trust anchors"),
              file=sys.stderr)
        return EX_FAILED
    proof = provenance.describe(path, anchors)
    if proof.get("present"):
        proof["trust_anchor"] = anchor_source
        if proof.get("trusted") and anchor_source and "self-made" in anchor_source:
            proof["trust"] = (f"trusted by {anchor_source} only: any other verifier shows this signer as untrusted "
                              "(set c2pa_cert and c2pa_key to a certificate on a trust list)")
        elif proof.get("trusted"):
            proof["trust"] = f"trusted by {anchor_source}"
    if made is None and proof.get("recipe"):
        made, source = proof["recipe"], "c2pa"
    if args.sidecar:
        if made is None:
            print(terminal_safe(f"i2v-daemon: {args.file}: no i2v-daemon recipe in it (none of XMP, SEI, comment or "
                                "C2PA survived); a re-encoded file keeps none"), file=sys.stderr)
            return EX_FAILED
        print(terminal_json(recipe.as_sidecar(made), indent=2))
        return EX_OK
    if args.json:
        print(terminal_json({"file": str(path), "recipe": made, "recipe_source": source, "provenance": proof},
                            indent=2))
    else:
        print(_text(path, made, source, proof))
    broken = proof.get("present") and not proof.get("valid")
    return EX_FAILED if broken or (made is None and not proof.get("present")) else EX_OK


def _anchors(trust: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """PEM trust anchors and where they came from: --trust, else this daemon's configured chain or self-made root."""
    candidates = [(Path(settings.data_dir) / "c2pa" / "root.pem", "this daemon's self-made root")]
    cert: Path | None = getattr(settings, "c2pa_cert", None)
    if cert is not None:
        candidates.insert(0, (Path(cert), f"this daemon's certificate chain ({cert})"))
    if trust:
        candidates = [(Path(trust), f"--trust {trust}")]
    for pem, source in candidates:
        try:
            return pem.read_text(), source
        except OSError:
            if trust:
                raise
            continue
    return None, None


_WHERE = {
    "xmp": "the XMP box", "sei": "the video stream's SEI (the XMP box and tags were stripped)",
    "comment": "the comment tag (the XMP box and SEI were stripped)", "c2pa": "the C2PA manifest",
}


def _text(path: Path, made: dict[str, Any] | None, source: str | None, proof: dict[str, Any]) -> str:
    safe = terminal_safe
    lines = [safe(str(path))]
    if made is None:
        lines.append("  recipe: none (a re-encoded or foreign file keeps none)")
    else:
        lines.append(f"  recipe (from {_WHERE.get(source or '', source)}):")
        lines.append(f"    prompt: {safe(str(made.get('prompt') or ''))}")
        if made.get("negative_prompt"):
            lines.append(f"    negative prompt: {safe(str(made['negative_prompt']))}")
        rate = f"{made.get('fps')} fps"
        if made.get("output_fps") and made.get("output_fps") != made.get("fps"):
            rate += f" → {made['output_fps']} fps ({made.get('interpolation')})"
        lines.append(f"    seed {made.get('seed')} · {made.get('width')}x{made.get('height')} · "
                     f"{made.get('num_frames')} frames · {made.get('steps')} steps · guidance "
                     f"{made.get('guidance_scale')} · {rate} · scheduler {made.get('scheduler') or 'default'}")
        lora = f" · LoRA {safe(str(made['lora']))} × {made.get('lora_scale')}" if made.get("lora") else ""
        lines.append(f"    model {safe(str(made.get('model')))} ({safe(str(made.get('model_id')))}, "
                     f"{made.get('family')}){lora} · {made.get('generator')}")
        if made.get("input"):
            lines.append(f"    input {safe(str(made['input'].get('name')))} sha256 {made['input'].get('sha256')}")
    if not proof.get("present"):
        why = f": {proof['error']}" if proof.get("error") else " (never signed, provenance = \"off\", or stripped)"
        lines.append(f"  provenance: no C2PA manifest{why}")
        return "\n".join(lines)
    signer = proof.get("signer") or {}
    verdict = "valid" if proof.get("valid") else "INVALID"
    lines.append(f"  provenance (C2PA): {verdict} · state {proof.get('state')} · {proof.get('trust')}")
    lines.append(f"    signer {safe(str(signer.get('common_name')))} (issuer {safe(str(signer.get('issuer')))}, "
                 f"{signer.get('alg')}{', signed ' + str(signer['time']) if signer.get('time') else ''})")
    dst = proof.get("digital_source_type") or "none"
    label = " (made by a trained model: AI-generated)" if dst.endswith("trainedAlgorithmicMedia") else ""
    lines.append(f"    made by {', '.join(proof.get('generator') or []) or 'unknown'} · actions "
                 f"{', '.join(a or '?' for a in proof.get('actions') or [])} · digitalSourceType {dst}{label}")
    for ing in proof.get("ingredients") or []:
        lines.append(f"    ingredient {safe(str(ing.get('title')))} ({ing.get('relationship')}) sha256 "
                     f"{ing.get('sha256')}")
    errors = proof.get("errors") or []
    lines.append("    validation errors: " + ("none" if not errors else ""))
    lines += [f"      {safe(e)}" for e in errors]
    return "\n".join(lines)
