"""The DeepSpeed internals ds_ext relies on, checked against the installed DeepSpeed in one place.

``ds_ext/_deepspeed.py`` lists every non-public DeepSpeed name it uses: :data:`INTERNALS` as (importable path,
attribute), :data:`INSTANCE_INTERNALS` as (what, attribute) for names that exist only on built objects. The first
test resolves all of them and fails ONCE, listing every missing name and the DeepSpeed version, so a DeepSpeed
upgrade breaks here, with one message, instead of somewhere deep in a feature. The second test keeps the adapter
the only user: no listed attribute name appears in ``ds_ext/`` outside ``_deepspeed.py``.

What each "what" of :data:`INSTANCE_INTERNALS` is checked on (built only when a listed name needs it, in one spawned
process, world size 1, gloo on CPU, with stock ``deepspeed.initialize``, so an attribute ds_ext itself adds cannot
satisfy the check):

- ``engine``, ``zero_optimizer``: a ZeRO-1 ``DeepSpeedEngine`` and its optimizer after one training step;
- ``loss_scaler``: DeepSpeed's ``DynamicLossScaler`` (the fp16 dynamic scaler, the one class with every scaler
  field; the static scaler of fp32/bf16 runs has a subset, and ds_ext reads the fields only where present);
- ``zero_param``: a parameter of a ZeRO-2 engine after a backward; a flag DeepSpeed only *reads* with
  ``getattr(param, name, default)`` (``ds_grad_is_ready``) counts as present when the ZeRO optimizer's module still
  reads it (the name appears in its source);
- ``pipeline_engine``, ``pipeline_module``: a 1-stage ``PipelineEngine`` after one ``train_batch`` and its
  ``PipelineModule``.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]
WHATS = ("engine", "zero_optimizer", "pipeline_engine", "pipeline_module", "pipeline_grid", "loss_scaler",
         "zero_param", "comm_backend")

pytestmark = pytest.mark.timeout(300)


def _registered():
    from ds_ext import _deepspeed, _deepspeed_launcher
    return list(_deepspeed.INTERNALS) + list(_deepspeed_launcher.INTERNALS), list(_deepspeed.INSTANCE_INTERNALS)


def resolve(path: str):
    """Import the longest importable module prefix of ``path`` and walk the rest as attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no importable prefix in {path!r}")


def missing_static(internals) -> list:
    missing = []
    for path, attr in internals:
        try:
            obj = resolve(path)
        except (ImportError, AttributeError) as e:
            missing.append(f"{path} (cannot import: {e})")
            continue
        if not hasattr(obj, attr):
            missing.append(f"{path}.{attr}")
    return missing


CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}


def _zero_engine(stage: int):
    import deepspeed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=dict(CONFIG, zero_optimization={"stage": stage}))
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    return engine


def _pipeline_engine():
    import deepspeed
    from deepspeed.pipe import PipelineModule
    torch.manual_seed(0)
    module = PipelineModule([torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)], num_stages=1,
                            loss_fn=lambda out, y: (out - y).pow(2).mean())
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      config=dict(CONFIG, zero_optimization={"stage": 1}))
    engine.train_batch(iter([(torch.randn(2, 8), torch.randn(2, 1))]))
    return engine, module


def _instance_body(instance_internals) -> list:
    """Build only the objects the list names; return the missing ``what.attribute`` entries."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    needed = {what for what, _ in instance_internals}
    objects = {}
    if needed & {"engine", "zero_optimizer"}:
        engine = _zero_engine(1)
        engine.step()
        objects.update(engine=engine, zero_optimizer=engine.optimizer)
    if "zero_param" in needed:
        engine2 = _zero_engine(2)
        objects["zero_param"] = next(engine2.module.parameters())
        zero_source = inspect.getsource(inspect.getmodule(type(engine2.optimizer)))
    if "loss_scaler" in needed:
        objects["loss_scaler"] = DynamicLossScaler(init_scale=2 ** 16, scale_window=1000, min_scale=1,
                                                   delayed_shift=2, consecutive_hysteresis=False)
    if needed & {"pipeline_engine", "pipeline_module", "pipeline_grid"}:
        objects["pipeline_engine"], objects["pipeline_module"] = _pipeline_engine()
        objects["pipeline_grid"] = objects["pipeline_module"].mpu()
    if "comm_backend" in needed:
        from ds_ext import _deepspeed
        objects["comm_backend"] = _deepspeed.comm_backend()  # set by deepspeed.initialize's init_distributed
    missing = []
    for what, attr in instance_internals:
        present = hasattr(objects[what], attr)
        if what == "zero_param" and not present:
            present = re.search(rf"[\"']{re.escape(attr)}[\"']", zero_source) is not None
        if not present:
            missing.append(f"{what} ({type(objects[what]).__module__}.{type(objects[what]).__name__}).{attr}")
    return missing


def test_every_registered_deepspeed_internal_exists():
    import deepspeed
    internals, instance_internals = _registered()
    assert internals and instance_internals, "no internals registered in ds_ext/_deepspeed.py"
    unknown = sorted({what for what, _ in instance_internals} - set(WHATS))
    assert not unknown, f"INSTANCE_INTERNALS uses unknown kinds {unknown}; allowed: {WHATS}"
    missing = missing_static(internals)
    if instance_internals:
        missing += run_distributed(_instance_body, world_size=1, args=(instance_internals,), timeout=240)[0]
    assert not missing, (f"DeepSpeed {deepspeed.__version__} lacks {len(missing)} internal(s) ds_ext/_deepspeed.py "
                         "relies on (update the adapter, or the pin in setup.py):\n  " + "\n  ".join(missing))


def uses_of(names, files, root: Path = ROOT) -> list:
    """``file:line: name`` for each ``.name`` attribute access, quoted ``"name"`` or ``import ... name``."""
    found = []
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in names:
                word = re.escape(name)
                if re.search(rf"\.{word}\b|[\"']{word}[\"']|\bimport\s.*\b{word}\b", line):
                    found.append(f"{path.relative_to(root)}:{lineno}: {name}")
    return found


def test_registered_internals_are_used_only_by_the_adapter():
    from ds_ext import _deepspeed  # the launcher adapter's names are generic (main): its module path is checked
    internals, instance_internals = _deepspeed.INTERNALS, _deepspeed.INSTANCE_INTERNALS
    names = sorted({attr for _, attr in internals + instance_internals})
    files = [p for p in sorted((ROOT / "ds_ext").rglob("*.py"))
             if p.name not in ("_deepspeed.py", "_deepspeed_launcher.py") or p.parent != ROOT / "ds_ext"]
    found = uses_of(names, files)
    assert not found, ("DeepSpeed internals used outside ds_ext/_deepspeed.py (add a function to the adapter and "
                       "call it instead):\n  " + "\n  ".join(found))


def test_only_the_launcher_adapter_imports_deepspeeds_launcher():
    """``ds-ext`` reaches DeepSpeed's runner through ``ds_ext/_deepspeed_launcher.py`` only (its names are in the
    adapter's INTERNALS, checked above); the runner's generic names (``main``, ``parse_args``) cannot be grepped,
    so the module path is."""
    files = [p for p in sorted((ROOT / "ds_ext").rglob("*.py")) if p.name != "_deepspeed_launcher.py"]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"deepspeed\.launcher|from deepspeed import launcher", line)]
    assert not found, "DeepSpeed's launcher used outside ds_ext/_deepspeed_launcher.py:\n  " + "\n  ".join(found)


def test_the_checks_can_fail(tmp_path):
    """The resolver reports what is missing; the grep sees attribute access, quoted names and imports, whole
    words only."""
    assert missing_static([("deepspeed.runtime.engine.DeepSpeedEngine", "step"),
                           ("deepspeed.runtime.engine.DeepSpeedEngine", "no_such_method_xyz"),
                           ("deepspeed.no_such_module_xyz.Thing", "x")])[0] == \
        "deepspeed.runtime.engine.DeepSpeedEngine.no_such_method_xyz"
    f = tmp_path / "m.py"
    f.write_text("a = opt.cdb\nb = getattr(x, 'cdb')\nfrom deepspeed.comm.comm import cdb\nc = x.cdb_other\n"
                 "d = 'cdbx'\ncdb = 1\n")
    assert [u.split(":")[1] for u in uses_of(["cdb"], [f], tmp_path)] == ["1", "2", "3"]
