"""The config being run, as a component sees it: MONAI's ``ConfigParser`` resolving it, found up the call stack the
way :func:`tpp_monai.workflows.bundle_root` finds the workflow (MONAI passes no parser to a component). Components
read the config's top-level settings from here, so a config states each setting once."""

from __future__ import annotations

import inspect
import json
import re

from monai.bundle import ConfigParser

from tpp_monai.errors import ConfigError

#: Top-level keys that are parts of the workflow, not settings: everything else is a setting, checked and recorded.
NOT_SETTINGS = {"imports", "initialize", "finalize", "run", "network_def", "network", "network_module",
                "pretext_net", "loss", "optimizer", "train", "validate", "test", "evaluator", "handlers", "inferer",
                "postprocessing", "preprocessing", "dataset", "dataloader", "checkpoint_loader", "key_metric",
                "additional_metrics", "amp_kwargs", "trainable_params", "pretrain_tpp", "finetune", "evaluate",
                "inference", "init_cost", "peft_init"}  # fmt: skip

_REFERENCE = re.compile(r"@([\w#]+)")


class RunningConfig:
    """The top-level keys of the config being resolved, raw and resolved."""

    def __init__(self, parser: ConfigParser) -> None:
        self.parser = parser
        self.raw = parser.get()

    @classmethod
    def find(cls) -> RunningConfig:
        """The config of the component being built: the nearest ``ConfigParser`` up the call stack."""
        frame = inspect.currentframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return cls(owner)
            frame = frame.f_back
        raise ConfigError(
            "this component reads the settings of the bundle config being run (python -m monai.bundle run ...): "
            "reference it from a config instead of calling it directly"
        )

    def plain(self, key: str, seen: frozenset = frozenset()) -> bool:
        """Whether ``key`` resolves without building a section (``@train#...``), itself or through the top-level
        keys it refers to (``"epochs": "@iterations"``)."""
        for ref in _REFERENCE.findall(json.dumps(self.raw.get(key), default=str)):
            if "#" in ref or ref in NOT_SETTINGS:
                return False
            if ref in self.raw and ref not in seen and not self.plain(ref, seen | {key}):
                return False
        return True

    def get(self, key: str, default: object = None) -> object:
        return self.parser.get_parsed_content(key) if key in self.raw else default

    def setting_keys(self, only_plain: bool = True) -> list[str]:
        return [k for k in self.raw if k not in NOT_SETTINGS and not k.startswith("_") and "#" not in k
                and (not only_plain or self.plain(k))]  # fmt: skip

    def settings(self, keys: object = None, only_plain: bool = True) -> tuple[dict, list[str]]:
        """The resolved settings (all, or those in ``keys``) and the errors of those that could not be resolved."""
        values, problems = {}, []
        for key in self.setting_keys(only_plain):
            if keys is not None and key not in keys:
                continue
            try:
                values[key] = self.get(key)
            except ConfigError as err:
                problems.append(f"{key}: {err}")
        return values, problems
