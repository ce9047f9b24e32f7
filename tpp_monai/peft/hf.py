"""huggingface peft as a method source: ``method: "peft.<tuner>"`` for every tuner of the installed peft that wraps
a backbone's layers (:mod:`tpp_monai.contract`, attach mode ``"wrap"``).

**Which tuners.** Read at run time from the installed peft's registry (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``
and ``PEFT_TYPE_TO_PREFIX_MAPPING``), by their lower-case type name: ``peft.lora``, ``peft.ia3``, ``peft.loha``,
``peft.lokr``, ``peft.oft``, ``peft.boft``, ``peft.vera``, ``peft.fourierft``, ``peft.hra``... and ``peft.dora``
(LoRA with ``use_dora``). Left out, with the reason :func:`~tpp_monai.peft.hf_tuners.excluded` gives:
prompt-learning tuners (they learn virtual tokens of a language model's input embedding), the tuners
:data:`~tpp_monai.peft.hf_tuners.NOT_WRAPPING` names (they need a transformers language model or a training loop that
calls them), and any tuner whose config cannot be built without extra input.
Whether a tuner can wrap a given backbone is decided by a probe (:func:`why_not`): the tuner is injected into a copy of
the backbone built on PyTorch's meta device (a CPU copy when the tuner's own initialisation needs data, e.g. an SVD),
it must add trainable parameters, wrap no task-head layer, and every layer it wraps must run in a forward pass.
Nothing of the real network is built before that answer, and a refusal names the tuners that can.

**Options.** ``method_options`` are the tuner's config fields (``r``, ``lora_alpha``, ``target_modules``...; unknown
keys are refused with the valid ones; peft's bookkeeping fields and ``modules_to_save`` are not options: the
workflows train the task head themselves). Unset fields keep peft's defaults, except the targets:

* ``target_modules`` (default): every layer the backbone lists in ``interface().wrap_targets`` (roles ``attention``,
  ``attention_out``, ``mlp``, ``conv``) inside its encoder blocks, as full module names, so that no layer of a task
  head with a similar name (UNETR's ``norm1``) is wrapped. timm-layout ViTs: ``attn.qkv``, ``attn.proj``,
  ``mlp.fc1``, ``mlp.fc2``. MedCoSS: ``self_attn.out_proj``, ``linear1``, ``linear2``: its fused q/k/v projection is a
  raw parameter (``self_attn.in_proj_weight``) that its attention reads itself, and peft's ``target_parameters``
  applies its update only while the wrapped module's own forward runs, which MedCoSS never calls (the probe refuses
  it). STU-Net: ``conv1``, ``conv2`` of every residual block. ``peft.ln_tuning``: the normalisation layers of the
  blocks.
* ``feedforward_modules`` (IA3, default): the ``mlp`` role's layers among those targets.

Given ``target_modules`` follow peft's own rule (suffixes of module names, or one regular expression).

**Injection.** ``peft.PeftModel(backbone, config)`` replaces the target layers in place, so the backbone object stays
the network with its own API; the ``PeftModel`` is kept on it as a plain attribute (``PEFT_MODEL_ATTR``, not a
submodule) for peft's state-dict functions and the data-driven initialisations. (``inject_adapter_in_model`` does the
same but refuses the tuners whose shared tensors live on the tuner object, VeRA among them.) The target parameters are
the tensors whose name has a component starting with the tuner's own prefix (``lora_``, ``ia3_``, ``hada_``...).

**Data-driven LoRA initialisations** (``init_lora_weights``): ``pissa``/``pissa_niter_<n>`` and ``olora`` run when
peft injects (an SVD or QR of the frozen weights); ``eva`` (SVD of the downstream layer inputs) and ``corda``
(covariance of the layer inputs, then injection) run on a data loader in :func:`initialize_from_data`, the finetune
workflow's ``peft_init`` component. Each records its cost (:func:`tpp_monai.workflows.costs.write_init_cost`).

Here: injection, the probe, the registry entry and the data-driven initialisations. The catalogue, the options and
the default targets: :mod:`tpp_monai.peft.hf_tuners`; adapter files: :mod:`tpp_monai.peft.files`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from tpp_monai.compat import import_peft
from tpp_monai.contract import GLOBAL_FEATURE, hooks_of
from tpp_monai.errors import ConfigError
from tpp_monai.peft.hf_tuners import (
    ADAPTER,
    PEFT_MODEL_ATTR,
    PREFIX,
    WEIGHT_INITS,
    Tuner,
    default_targets,
    first_line,
    get_tuner,
    is_target,
    lora_init,
    options_class,
    options_dict,
    peft_config,
    peft_model,
    quiet,
    tuner_names,
    wrapped_layers,
)
from tpp_monai.peft.registry import MethodSource, MethodSpec, register_source


# ----- injection -----------------------------------------------------------------------------------------------------
def _inject(tuner: Tuner, model: nn.Module, options: object, probe: bool = False) -> object:
    """Wrap ``model``'s layers with ``tuner`` in place; returns the options with the targets resolved."""
    peft = import_peft()
    given = options_dict(options)
    resolved = {**default_targets(tuner, model), **given} if "target_modules" not in given else dict(given)
    values = dict(resolved)
    init = lora_init(values)
    if init == "corda" or (probe and init is not None):
        values["init_lora_weights"] = True  # CorDA injects after its covariance pass (initialize_from_data)
    started = time.perf_counter()
    try:
        with quiet():
            # a probe on the meta device skips the adapters' initialisation (it may need tensor data: an SVD)
            empty = probe and next(model.parameters()).is_meta
            pm = peft.PeftModel(model, peft_config(tuner, values), adapter_name=ADAPTER, low_cpu_mem_usage=empty)
    except Exception as err:  # peft raises ValueError, TypeError, RuntimeError... for layers it cannot wrap
        if probe and _needs_data(err):
            raise
        raise _Unwrappable(first_line(err)) from None
    object.__setattr__(model, PEFT_MODEL_ATTR, pm)  # a plain attribute: no module cycle, copied by deepcopy
    if init in WEIGHT_INITS and not probe:
        model.peft_init_cost = {"kind": f"peft-{init}", "seconds": time.perf_counter() - started, "device": "cpu"}
    _check_wrapped(tuner, model)
    return dataclasses.replace(options, **{k: v for k, v in resolved.items() if k not in given})


def _needs_data(err: BaseException) -> bool:
    """An error of an operation that meta tensors cannot run (an SVD, a data-dependent index)."""
    return isinstance(err, NotImplementedError) or (isinstance(err, RuntimeError) and "meta" in str(err).lower())


class _Unwrappable(Exception):
    """peft could not wrap the backbone's layers (the message says why)."""


def _check_wrapped(tuner: Tuner, model: nn.Module) -> None:
    layers = wrapped_layers(model)
    heads = {n.rsplit(".", 1)[0] for n in model.head_parameter_names()}
    in_head = [n for n in layers if any(n == h or n.startswith(f"{h}.") or h.startswith(f"{n}.") for h in heads)]
    if in_head:
        raise _Unwrappable(f"its target_modules match task-head layers {in_head[:4]}; name layers of the backbone")
    if not any(is_target(tuner.prefix, n) and p.requires_grad for n, p in model.named_parameters()):
        raise _Unwrappable(f"it added no trainable {tuner.prefix}* parameters to the backbone")


def inject(tuner: Tuner, model: nn.Module, options: object) -> object:
    """The ``inject`` of a ``peft.*`` method; a backbone the tuner cannot wrap is refused with the tuners that can."""
    try:
        return _inject(tuner, model, options)
    except _Unwrappable as err:
        backbone = getattr(model, "backbone_name", "") or type(model).__name__
        raise ConfigError(refusal(tuner.method, backbone, str(err))) from None


def refusal(method: str, backbone: str, reason: str) -> str:
    """One message: why ``method`` cannot tune ``backbone``, and the peft tuners that can (with default options;
    tuners whose initialisation needs tensor data are named apart, unprobed: their probe builds a CPU copy)."""
    from tpp_monai.backbones import BACKBONES

    can, unprobed = [], []
    for name in tuner_names() if backbone in BACKBONES else ():
        answer = _probe(name, backbone, "{}", False)
        if answer is None:
            can.append(f"peft.{name}")
        elif answer is _NEEDS_DATA:
            unprobed.append(f"peft.{name}")
    also = f" (not probed, their initialisation needs tensor data: {', '.join(unprobed)})" if unprobed else ""
    return (f"PEFT method {method!r} cannot tune backbone {backbone!r}: {reason}; peft tuners that can: "
            f"{', '.join(can) or '(none)'}{also}")  # fmt: skip


# ----- the probe -----------------------------------------------------------------------------------------------------
def why_not(name: str, backbone: str, options: Mapping | None = None) -> str | None:
    """Why tuner ``name`` (with ``options``) cannot wrap backbone ``backbone``, or ``None`` when it can.

    Decided on a copy of the backbone one block deep (where it has a ``depth``), built on the meta device (no
    memory), or on the CPU when the tuner's own initialisation needs tensor data; cached per backbone, tuner and
    options.
    """
    key = json.dumps(dict(options or {}), sort_keys=True, default=str)
    return _probe(name, backbone, key, True)


_NEEDS_DATA = "its initialisation needs tensor data (not probed on the CPU)"


@functools.cache
def _probe(name: str, backbone: str, options_key: str, on_cpu: bool) -> str | None:
    from tpp_monai.peft.registry import make_config

    tuner = get_tuner(name)
    config = make_config(tuner.method, json.loads(options_key))
    for device in ("meta", "cpu") if on_cpu else ("meta",):
        try:
            return _probe_on(device, tuner, backbone, config)
        except Exception as err:
            if device == "meta" and _needs_data(err):
                continue  # the tuner's initialisation needs tensor data: probe with real tensors
            return f"the wrapped backbone does not run ({first_line(err)})"
    return _NEEDS_DATA


def _probe_on(device: str, tuner: Tuner, backbone: str, config: object) -> str | None:
    from tpp_monai.backbones import build_backbone, get_backbone_spec

    # one block is enough (every block's layers have the shapes of the others'), and cheaper where peft initialises
    depth = get_backbone_spec(backbone).kwargs.get("depth")
    shallow = {"depth": 1} if isinstance(depth, int) else {}
    with torch.device(device), quiet():
        model = build_backbone(backbone, task="features", **shallow)
    try:
        _inject(tuner, model, config, probe=True)
    except _Unwrappable as err:
        return str(err)
    layers = wrapped_layers(model)
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: ran.add(n)) for n, m in layers.items()]
    iface = model.interface()
    x = torch.zeros(1, iface.in_channels, *(2 * p for p in iface.patch_size), device=device)
    model.eval()
    with torch.no_grad(), quiet():  # the forward the pretexts run (every block and level), else the task's
        model.global_features(x) if GLOBAL_FEATURE in hooks_of(model) else model(x)
    for hook in hooks:
        hook.remove()
    idle = [n for n in layers if n not in ran]
    if idle:
        return (f"the layers it wraps never run in the backbone's forward ({idle[:3]}{'...' if len(idle) > 3 else ''}"
                "): the backbone reads their tensors directly")  # fmt: skip
    return None


# ----- the registry entries ----------------------------------------------------------------------------------------
def resolve(name: str) -> MethodSpec:
    tuner = get_tuner(name)
    return MethodSpec(
        name=tuner.method,
        config=options_class(tuner),
        inject=functools.partial(inject, tuner),
        target=lambda model, param, prefix=tuner.prefix: is_target(prefix, param),
        attach="wrap",
        requires=lambda cfg: frozenset(),
        identity_at_init=False,  # peft's tuners differ (LoRA starts as the identity, FourierFT does not)
        pretrainable=True,
        summary=f"huggingface peft {tuner.config_cls.__name__}{' with use_dora' if tuner.name == 'dora' else ''}",
        applies=lambda backbone, options, n=name: why_not(n, backbone, options),
        config_dict=options_dict,
    )


SOURCE = register_source(MethodSource(
    prefix=PREFIX, resolve=resolve, names=tuner_names,
    summary="every tuner of the installed huggingface peft that wraps layers, e.g. peft.lora, peft.dora, peft.ia3",
))  # fmt: skip


# ----- data-driven initialisations ---------------------------------------------------------------------------------
def init_kind(model: nn.Module) -> str | None:
    """The LoRA initialisation the model's method options ask for (``eva``, ``corda``, ``pissa``, ``olora``)."""
    method = str(getattr(model, "peft_method", "") or "")
    if not method.startswith(f"{PREFIX}."):
        return None
    return lora_init(getattr(model, "peft_options", {}) or {})


def initialize_from_data(model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
    """Run the data-driven initialisation the options ask for: EVA (``initialize_lora_eva_weights``: incremental SVD
    of every target layer's inputs over ``batches()`` until its components converge) or CorDA (covariance of the
    layer inputs over ``batches()``, then peft injects with ``init_lora_weights="corda"``). ``batches`` yields image
    tensors on the model's device."""
    peft = import_peft()
    kind = init_kind(model)
    pm = peft_model(model)
    if kind == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        with quiet():
            initialize_lora_eva_weights(
                pm, dataloader=_Replayable(batches), forward_fn=lambda _, x: model(x),
                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=_token_rows, show_progress_bar=False,
            )  # fmt: skip
    elif kind == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        config = pm.peft_config[ADAPTER]
        with quiet():
            pm.base_model.unload()  # back to the plain layers: CorDA measures them, then peft injects
            training = model.training
            model.eval()

            def run() -> None:
                with torch.no_grad():
                    for x in batches():
                        model(x)

            config = dataclasses.replace(config, init_lora_weights="corda")
            preprocess_corda(model, config, run_model=run)
            model.train(training)
            object.__setattr__(model, PEFT_MODEL_ATTR, peft.PeftModel(model, config, adapter_name=ADAPTER))


def _token_rows(layer_input: object, model_input: object, layer_name: str) -> torch.Tensor:
    """A layer's input as rows of features: tokens ``[B, N, D] -> [B N, D]``, feature maps ``[B, C, ...] ->
    [B ..., C]`` (the channels are what a wrapped convolution mixes)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1]) if x.ndim <= 3 else x.movedim(1, -1).reshape(-1, x.shape[1])


class _Replayable:
    """An iterable that restarts ``batches()`` on every ``iter`` (EVA cycles through its loader), with a length."""

    def __init__(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return 1
