"""The optimizer of a run, through the library that defines it: torch for AdamW, SGD, Adafactor and Muon;
bitsandbytes for the 8-bit and paged AdamW and Lion; galore-torch, apollo-torch, badam and adam-mini for
LLaMA-Factory's use_galore / use_apollo / use_badam / use_adam_mini. LoRA+ is AdamW with the B matrices' learning
rate raised. Every optimizer gets tunesmith's decay / no-decay parameter groups (no weight decay on biases and
norms) where it takes groups, so all engines and optimizers decay the same parameters.

Layerwise GaLore / APOLLO step each parameter in a hook as soon as backward has produced its gradient, and free
that gradient (:class:`LayerwiseOptimizer`); the step the loop takes afterwards only advances the schedule.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.config.optimizer_args import OptimizerArgs
from tunesmith.config.schema import TrainArgs
from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger

log = get_logger("train")

Groups = list[dict[str, Any]]
Factory = Callable[[Groups, TrainArgs], torch.optim.Optimizer]


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (any 1-D parameter) and anything named *norm*/*bias* get no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or "bias" in lowered or "norm" in lowered


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def param_groups(model: torch.nn.Module, weight_decay: float) -> Groups:
    """Trainable parameters split into a decayed and a not-decayed group (empty groups left out)."""
    decay, no_decay = [], []
    for name, param in trainable(model):
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------- plain optimizers


def _adamw(groups: Groups, train: TrainArgs, **extra: Any) -> torch.optim.Optimizer:
    """torch's AdamW, fused (one kernel over all parameters) wherever torch has the fused kernel for every
    parameter's device and dtype, else multi-tensor (foreach). The same update up to float rounding; on CPU the
    per-parameter loop that torch picks by default took 0.67 s a step for SmolLM2-135M's 135M weights, foreach
    0.38 s, fused 0.07 s."""
    if "fused" not in extra:
        fused = _fusable([p for group in groups for p in group["params"]])
        extra = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_epsilon, **extra)


def _fusable(params: list[torch.Tensor]) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def _bnb(name: str) -> Factory:
    def build(groups: Groups, train: TrainArgs) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        kind = getattr(bnb.optim, name)
        return kind(groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                    **({} if "Lion" in name else {"eps": train.adam_epsilon}))

    return build


PLAIN: dict[str, Factory] = {
    "adamw_torch": _adamw,
    "adamw_hf": _adamw,
    "adamw_torch_fused": lambda groups, train: _adamw(groups, train, fused=True),
    "sgd": lambda groups, train: torch.optim.SGD(groups, lr=train.learning_rate),
    "adafactor": lambda groups, train: torch.optim.Adafactor(groups, lr=train.learning_rate),
    "adamw_8bit": _bnb("AdamW8bit"),
    "adamw_bnb_8bit": _bnb("AdamW8bit"),
    "paged_adamw_8bit": _bnb("PagedAdamW8bit"),
    "paged_adamw_32bit": _bnb("PagedAdamW32bit"),
    "lion_8bit": _bnb("Lion8bit"),
    "lion_32bit": _bnb("Lion32bit"),
    "paged_lion_8bit": _bnb("PagedLion8bit"),
    "paged_lion_32bit": _bnb("PagedLion32bit"),
}


# ------------------------------------------------------------------------------- LLaMA-Factory's optimizers


def _projected(model: torch.nn.Module, targets: list[str]) -> set[int]:
    """ids of the 2-D weights of the target linear layers (``all``: every linear layer but the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == ["all"] or any(target in name for target in targets):
            chosen.update(id(p) for p in module.parameters() if p.requires_grad and p.ndim == 2)
    return chosen


def _low_rank(model: torch.nn.Module, train: TrainArgs, opt: OptimizerArgs, kind: str) -> torch.optim.Optimizer:
    """GaLore or APOLLO: the target weights in a group with the projection settings, the rest as usual."""
    if kind == "galore":
        import galore_torch as lib

        targets = opt.galore_target
        settings = {"rank": opt.galore_rank, "update_proj_gap": opt.galore_update_interval,
                    "scale": opt.galore_scale, "proj_type": opt.galore_proj_type}
        classes = {"adamw_torch": lib.GaLoreAdamW, "adamw_hf": lib.GaLoreAdamW, "adamw_8bit": lib.GaLoreAdamW8bit,
                   "adamw_bnb_8bit": lib.GaLoreAdamW8bit, "paged_adamw_8bit": lib.GaLoreAdamW8bit,
                   "adafactor": lib.GaLoreAdafactor}
        layerwise = opt.galore_layerwise
    else:
        import apollo_torch as lib

        targets = opt.apollo_target
        settings = {"rank": opt.apollo_rank, "proj": opt.apollo_proj, "proj_type": opt.apollo_proj_type,
                    "update_proj_gap": opt.apollo_update_interval, "scale": opt.apollo_scale,
                    "scale_type": opt.apollo_scale_type}
        classes = {"adamw_torch": lib.APOLLOAdamW, "adamw_hf": lib.APOLLOAdamW}
        layerwise = opt.apollo_layerwise
    if opt.optim not in classes:
        raise ConfigError(f"use_{kind} works with optim: {', '.join(classes)}, not {opt.optim}; set one of those")
    kind_class = classes[opt.optim]
    projected = _projected(model, targets)
    if not projected:
        raise ConfigError(f"{kind}_target {','.join(targets)} matches no trainable linear layer; name modules "
                          "of the model (q_proj, down_proj, …) or all")
    extra = {"scale_front": opt.apollo_scale_front} if kind == "apollo" else {}
    groups: Groups = []
    for group in param_groups(model, train.weight_decay):
        plain = [p for p in group["params"] if id(p) not in projected]
        low = [p for p in group["params"] if id(p) in projected]
        groups += [g for g in ({**group, "params": plain}, {**group, "params": low, **settings}) if g["params"]]

    def build(chosen: Groups) -> torch.optim.Optimizer:
        return kind_class(chosen, lr=train.learning_rate, **_betas(kind_class, train), **extra)

    if layerwise:
        return LayerwiseOptimizer(groups, build)
    return build(groups)


def _betas(kind_class: type, train: TrainArgs) -> dict[str, Any]:
    if "Adafactor" in kind_class.__name__:  # HF's Adafactor: a fixed lr needs its relative steps off
        return {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    return {"betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon}


def _badam(model: torch.nn.Module, train: TrainArgs, opt: OptimizerArgs) -> torch.optim.Optimizer:
    import badam

    groups = param_groups(model, train.weight_decay)
    named = list(model.named_parameters())
    if opt.badam_mode == "ratio":
        return badam.BlockOptimizerRatio(
            param_groups=groups, named_parameters_list=named, update_ratio=opt.badam_update_ratio,
            mask_mode=opt.badam_mask_mode, verbose=opt.badam_verbose, include_embedding=False,
            lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
        )
    return resumable_block_optimizer(
        base_optimizer=PLAIN[opt.optim](groups, train), named_parameters_list=named, block_prefix_list=None,
        switch_block_every=opt.badam_switch_interval, start_block=opt.badam_start_block,
        switch_mode=opt.badam_switch_mode, verbose=opt.badam_verbose,
    )


def resumable_block_optimizer(**kwargs: Any) -> torch.optim.Optimizer:
    """badam's BlockOptimizer with a state dict that holds where the block schedule is (the step, the active
    block, the next one, a random order's remainder) besides its base optimizer's state: BAdam's own saves only
    the latter, so a resumed run would start again from the first block."""
    import badam

    class ResumableBlockOptimizer(badam.BlockOptimizer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            del self.state_dict  # BAdam sets its base optimizer's state_dict on the instance, hiding the method

        def _active_block(self) -> int:
            active = [p for p in self.active_param_prefixs if p not in self.active_modules]
            return self.block_prefix_list.index(active)

        def state_dict(self) -> dict[str, Any]:
            return {"base": self.base_optimizer.state_dict(), "global_step": self.global_step,
                    "active": self._active_block(), "next": self.current_block_idx,
                    "order": list(getattr(self, "block_order", []))}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.current_block_idx = state_dict["active"]
            self.switch_trainable_params(verbose=0)  # fresh float32 copies of the restored weights of that block
            self.current_block_idx, self.block_order = state_dict["next"], list(state_dict["order"])
            self.global_step = state_dict["global_step"]
            self.base_optimizer.load_state_dict(state_dict["base"])

    return ResumableBlockOptimizer(**kwargs)


def _adam_mini(model: torch.nn.Module, train: TrainArgs) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    config = model.config
    heads = getattr(config, "num_attention_heads", 1)
    return Adam_mini(
        named_parameters=trainable(model), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon, weight_decay=train.weight_decay, model_sharding=False,
        dim=config.hidden_size, n_heads=heads, n_kv_heads=getattr(config, "num_key_value_heads", heads),
        verbose=False,
    )


def _muon(model: torch.nn.Module, train: TrainArgs) -> torch.optim.Optimizer:
    """torch.optim.Muon for the 2-D matrices but embeddings and the output head (LLaMA-Factory's split), AdamW
    for those and the 1-D parameters; Muon's lr scaled to AdamW's update size (Moonlight's rule, as LLaMA-Factory's
    vendored Muon), so one learning_rate serves both."""
    matrices, rest = [], []
    for name, param in trainable(model):
        is_matrix = param.ndim == 2 and "embed" not in name and "lm_head" not in name
        (matrices if is_matrix else rest).append((name, param))
    parts: list[torch.optim.Optimizer] = []
    if matrices:
        parts.append(torch.optim.Muon([p for _, p in matrices], lr=train.learning_rate,
                                      weight_decay=train.weight_decay, adjust_lr_fn="match_rms_adamw"))
    if rest:
        decay = [p for n, p in rest if not is_no_decay(n, p)]
        no_decay = [p for n, p in rest if is_no_decay(n, p)]
        groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        parts.append(_adamw(groups, train))
    return CombinedOptimizer(parts)


def _loraplus(model: torch.nn.Module, train: TrainArgs, opt: OptimizerArgs) -> torch.optim.Optimizer:
    """AdamW whose LoRA B matrices (and 1-D parameters, as LLaMA-Factory) learn ``loraplus_lr_ratio`` times faster."""
    assert opt.loraplus_lr_ratio is not None
    fast = train.learning_rate * opt.loraplus_lr_ratio
    buckets: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in trainable(model):
        decay = 0.0 if is_no_decay(name, param) else train.weight_decay
        if "lora_embedding_B" in name:
            lr = opt.loraplus_lr_embedding
        elif "lora_B" in name or param.ndim == 1:
            lr = fast
        else:
            lr = train.learning_rate
        buckets.setdefault((lr, decay), []).append(param)
    groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in buckets.items()]
    return PLAIN[opt.optim](groups, train)


def build_optimizer(model: torch.nn.Module, train: TrainArgs, opt: OptimizerArgs) -> torch.optim.Optimizer:
    """The optimizer ``opt`` chooses for the model's trainable parameters."""
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    if opt.use_galore or opt.use_apollo:
        return _low_rank(model, train, opt, "galore" if opt.use_galore else "apollo")
    if opt.loraplus_lr_ratio is not None:
        return _loraplus(model, train, opt)
    if opt.use_badam:
        return _badam(model, train, opt)
    if opt.use_adam_mini:
        return _adam_mini(model, train)
    if opt.use_muon:
        return _muon(model, train)
    return PLAIN[opt.optim](param_groups(model, train.weight_decay), train)


# ------------------------------------------------------------------------------------------------ wrappers


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together; their param groups are this one's, so a
    schedule sets every learning rate."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        super().__init__([group for part in parts for group in part.param_groups], {})
        self.param_groups = [group for part in parts for group in part.param_groups]  # the parts' own dicts

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for part in self.parts:
            part.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
        # torch's load_state_dict replaces each part's group dicts: point at the new ones, or the schedule would
        # set learning rates nobody reads
        self.param_groups = [group for part in self.parts for group in part.param_groups]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook the moment backward has accumulated the parameter's
    gradient, which is then freed (GaLore / APOLLO layerwise: the gradients of the whole model never exist at
    once). ``step`` does nothing; the schedule sets the lr of this optimizer's groups, which the hooks pass on."""

    def __init__(self, groups: Groups, build: Callable[[Groups], torch.optim.Optimizer]) -> None:
        singles = [{**group, "params": [param]} for group in groups for param in group["params"]]
        self.inner = [build([single]) for single in singles]
        super().__init__(singles, {})
        self.grad_norm_sq = 0.0
        for group, inner in zip(self.param_groups, self.inner, strict=True):
            group["params"][0].register_post_accumulate_grad_hook(self._hook(group, inner))

    def _hook(self, group: dict[str, Any], inner: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step_now(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            self.grad_norm_sq += float(param.grad.detach().float().pow(2).sum())
            inner.param_groups[0]["lr"] = group["lr"]
            inner.step()
            inner.zero_grad(set_to_none=True)

        return step_now

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def take_grad_norm(self) -> float:
        """The norm of the gradients the hooks consumed since the last call (for the log)."""
        norm, self.grad_norm_sq = math.sqrt(self.grad_norm_sq), 0.0
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [inner.state_dict() for inner in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for inner, state in zip(self.inner, state_dict["inner"], strict=True):
            inner.load_state_dict(state)


def describe(opt: OptimizerArgs) -> str:
    """The optimizer in a few words, for the start-of-run log line."""
    for key, text in (("use_galore", "GaLore"), ("use_apollo", "APOLLO"), ("use_badam", "BAdam"),
                      ("use_adam_mini", "Adam-mini"), ("use_muon", "Muon + AdamW")):
        if getattr(opt, key):
            layerwise = getattr(opt, key.replace("use_", "") + "_layerwise", False)
            return f"{text} ({opt.optim}{', layerwise' if layerwise else ''})"
    if opt.loraplus_lr_ratio is not None:
        return f"LoRA+ ({opt.optim}, B matrices at {opt.loraplus_lr_ratio:g}× the lr)"
    return opt.optim


_PACKAGES = {"use_galore": ("galore_torch", "galore-torch"), "use_apollo": ("apollo_torch", "apollo-torch"),
             "use_badam": ("badam", "badam"), "use_adam_mini": ("adam_mini", "adam-mini")}


def _missing_package(cfg: Config) -> tuple[str, str] | None:
    """(key, pip name) of the chosen optimizer's library when it is not installed."""
    for key, (module, pip_name) in _PACKAGES.items():
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            return key, pip_name
    bnb = cfg.optim not in ("adamw_torch", "adamw_hf", "adamw_torch_fused", "sgd", "adafactor")
    if bnb and importlib.util.find_spec("bitsandbytes") is None:
        return f"optim: {cfg.optim}", "bitsandbytes"
    return None


def check_optimizer(cfg: Config, engine: str, world_size: int) -> None:
    """Refuse, before anything is loaded, what the chosen optimizer cannot do with this engine and batch."""
    missing = _missing_package(cfg)
    if missing is not None:
        raise ConfigError(f"{missing[0]} needs the {missing[1]} package; pip install {missing[1]} (or "
                          "tunesmith[optimizers])")
    layerwise = (cfg.use_galore and cfg.galore_layerwise) or (cfg.use_apollo and cfg.apollo_layerwise)
    name = "galore_layerwise" if cfg.use_galore else "apollo_layerwise"
    if layerwise and cfg.gradient_accumulation_steps != 1:
        raise ConfigError(f"{name}: true steps each parameter during backward, so it cannot accumulate gradients; "
                          "set gradient_accumulation_steps: 1 (raise the batch size instead)")
    if layerwise and (world_size > 1 or engine != "single"):
        raise ConfigError(f"{name}: true steps each parameter during backward, before the ranks have averaged its "
                          f"gradient; set {name}: false to train on {engine} with {world_size} rank(s)")
    if layerwise and cfg.fp16:
        raise ConfigError(f"{name}: true cannot unscale fp16 gradients step by step; use bf16: true")
    chosen = describe(cfg)
    custom = chosen not in ("adamw_torch", "adamw_hf")
    if engine == "deepspeed" and custom:
        raise ConfigError(f"the optimizer {chosen} is not DeepSpeed's: ZeRO partitions and steps its own "
                          "optimizer from the ds_config; use engine: ddp (or single) for it, or remove the "
                          "optimizer keys to train with DeepSpeed's AdamW")
    shards = engine == "fsdp2" and world_size > 1
    if shards and (cfg.use_galore or cfg.use_apollo or cfg.use_muon or cfg.use_badam or cfg.use_adam_mini
                   or cfg.optim not in ("adamw_torch", "adamw_hf", "adamw_torch_fused", "sgd")):
        raise ConfigError(f"the optimizer {chosen} needs each weight whole (a projection, an "
                          "orthogonalisation, block states or bitsandbytes' kernels), which fsdp2 splits over the "
                          "ranks; use engine: ddp, or optim: adamw_torch / adamw_torch_fused / sgd")


def state_classes() -> list[type]:
    """The classes that the optimizers' state dicts hold besides tensors and numbers (GaLore's and APOLLO's
    projectors), allowed when a checkpoint's optimizer.pt is loaded with weights_only; those of libraries that are
    not installed cannot be in a checkpoint this run can use."""
    classes: list[type] = []
    for module, names in (("galore_torch.galore_projector", ["GaLoreProjector"]),
                          ("apollo_torch.random_projector", ["GradientProjector"]),
                          ("apollo_torch.svd_projector", ["GaLoreProjector"])):
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        classes += [getattr(loaded, name) for name in names]
    return classes
