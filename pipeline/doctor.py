"""`optimize doctor`: what this machine offers the pipeline and the runner, and known conflicts."""

from __future__ import annotations

import platform
from importlib import metadata

import click

from pipeline.artifacts import TRACKED_LIBRARIES
from runtime.machine import nvidia_smi


def diagnose() -> tuple[list[str], list[str]]:
    """(facts, warnings) about libraries, execution providers and the GPU."""
    facts, warnings = [f"python {platform.python_version()} on {platform.machine()}"], []
    installed = {}
    for name in TRACKED_LIBRARIES:
        try:
            installed[name] = metadata.version(name)
            facts.append(f"{name} {installed[name]}")
        except metadata.PackageNotFoundError:
            pass
    if "onnxruntime" in installed and "onnxruntime-gpu" in installed:
        warnings.append(
            "onnxruntime and onnxruntime-gpu are both installed; they share one Python package and the last "
            "installed wins. Keep one: `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`"
        )
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        facts.append(f"onnxruntime providers: {', '.join(providers)}")
    except ImportError as e:
        providers = []
        warnings.append(f"onnxruntime does not import: {e}")
    try:
        import torch

        if torch.cuda.is_available():
            facts.append(f"torch sees GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
        else:
            facts.append(f"torch sees no GPU (build: {'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'})")
    except ImportError as e:
        warnings.append(f"torch does not import: {e}")
    gpu = nvidia_smi()
    if gpu:
        facts.append(f"nvidia-smi: {gpu}")
        if "CUDAExecutionProvider" not in providers:
            warnings.append("a GPU is present but onnxruntime has no CUDA provider: run `make install-cuda`")
    return facts, warnings


@click.command("doctor")
def doctor_command():
    """Print library versions, execution providers, the GPU and CUDA seen, and known conflicts."""
    facts, warnings = diagnose()
    for fact in facts:
        click.echo(fact)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if not warnings:
        click.echo("no known conflicts")
