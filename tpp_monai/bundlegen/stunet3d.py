"""The 3D bundles (paper §5.4, Table 10): STU-Net with Conv-Adapter and DINO target-parameter pre-training on LiTS and
KiTS19, and the full fine-tuning baselines.

What differs from the 2D bundles (STU-Net, Huang et al. 2023, and its nnU-Net recipe):

* backbone ``stunet_b`` (the size the STU-Net authors recommend for transfer, §1.7, #46), patches of ``image_size``
  (x, y, z after ``Orientationd("RAS")``) from volumes at 0.8 x 0.8 x 1.5 mm with per-volume z-score, sampled
  with tumour oversampling (:mod:`tpp_monai.data.transforms`);
* TPP stage: DINO by default (:mod:`tpp_monai.pretext.dino`: teacher on the bottleneck, DeSD-style student heads on
  every decoder level so decoder adapters learn; 3D multi-crop in :mod:`tpp_monai.pretext.transforms`), or
  masked-image modelling on the full-resolution decoder output (``--pretext mim``, :mod:`tpp_monai.pretext.mim`);
* fine-tuning: deep supervision on all five STU-Net heads with nnU-Net's Dice + CE weights, the STU-Net/nnU-Net
  optimiser (:class:`tpp_monai.data.recipes.FinetuneRecipe`);
* validation, evaluation and inference: Gaussian sliding window over whole volumes (deep supervision off in eval),
  softmax -> argmax; organ (label >= 1), tumour (label == 2), their mean and the label-1-only organ Dice per case,
  averaged; ``inference.json`` writes NIfTI label maps with each input's affine and shape.
"""

from __future__ import annotations

from tpp_monai.bundlegen import docs, parts
from tpp_monai.bundlegen.base import BundleKind
from tpp_monai.bundlegen.parts import comp

DEEP_SUPERVISION_WEIGHTS = [1, 0.5, 0.25, 0.125, 0]  # nnU-Net: 1/2^i, the coarsest head off (stunet.md §1.4)
# 3D DINO crops (x, y, z): multiples of STU-Net's stride product (16, 16, 32) with a bottleneck of more than one voxel
# in training: global 6 x 6 x 2, local 3 x 3 x 1 (stunet.md §1.3, §3.3).
DINO_3D = {"global_size": [96, 96, 64], "local_size": [48, 48, 32], "num_local": 4}
DEMO_PATCH = [32, 32, 32]  # the smallest cube STU-Net trains on with the default strides (stunet.md §5.3)


class STUNetBundle(BundleKind):
    """A 3D organ + tumour segmentation bundle on STU-Net-B."""

    spatial_dims = 3
    backbone = "stunet_b"
    dino_crops = DINO_3D

    def _common(self, workflow: str) -> dict:
        cfg = super()._common(workflow)
        cfg.update({
            # deep supervision: five outputs in training (loss), one in eval (sliding window)
            "backbone_options": {"deep_supervision": True},
            "cache_rate": 1.0,  # fraction of the resampled volumes kept in memory; lower it when RAM is short
            "sw_batch_size": 2,
            "sw_overlap": 0.5,  # nnU-Net's tile overlap
        })  # fmt: skip
        return cfg

    def _network_def(self, backbone_ckpt: str, tpp_ckpt: str, stage: str = "finetune") -> dict:
        task = {"task": "features"} if stage == "tpp" else {"task": "seg", "num_classes": self.info.num_classes}
        net = {"_target_": "tpp_monai.network.build_network", "backbone": "@backbone", **task, "method": "@method",
               "method_options": "@method_options", "backbone_ckpt": backbone_ckpt}  # fmt: skip
        if stage != "tpp":
            net["tpp_ckpt"] = tpp_ckpt
        return {**net, "stage": stage, "backbone_options": "@backbone_options"}

    @staticmethod
    def _sliding_window() -> dict:
        """Gaussian-weighted sliding window over the whole volume (nnU-Net: overlap 0.5, sigma 1/8 of the tile)."""
        return {"_target_": "SlidingWindowInferer", "roi_size": "@image_size", "sw_batch_size": "@sw_batch_size",
                "overlap": "@sw_overlap", "mode": "gaussian", "sigma_scale": 0.125}  # fmt: skip

    @staticmethod
    def _post(*middle: dict) -> dict:
        softmax = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
        argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
        return {"_target_": "Compose", "transforms": [softmax, *middle, argmax]}

    @staticmethod
    def _metrics(prefix: str) -> dict:
        """Per-case mean of organ and tumour Dice selects the model (stunet.md §4.4)."""
        handler = "tpp_monai.metrics.OrganTumourHandler"
        return {
            "key_metric": {f"{prefix}mean_dice": {"_target_": handler, "key": "mean", "save_details": False}},
            "additional_metrics": {f"{prefix}{k}_dice": {"_target_": handler, "key": k, "save_details": False}
                                   for k in ("organ", "tumour", "organ_label1")},
        }  # fmt: skip

    def _transforms(self, which: str) -> dict:
        return comp(f"tpp_monai.data.transforms.{which}_transforms", dataset="@dataset_name", image_size="@image_size")

    def pretrain_tpp(self) -> dict:
        tpp = self.recipe.tpp
        settings = {"pretext": comp("tpp_monai.pretext.default_pretext", backbone="@backbone"),
                    "tpp_epochs": tpp.epochs, "epochs": "@tpp_epochs", "batch_size": tpp.batch_size,
                    # MIM: SimMIM's weight decay 0.05, constant; the rate and warm-up as DINO's here
                    "lr": tpp.lr, "weight_decay": comp("pretext_setting", pretext="@pretext", mae=0.05, dino=0.04,
                                                       mim=0.05),
                    "weight_decay_end": comp("pretext_setting", pretext="@pretext", mae="@weight_decay", dino=0.4,
                                             mim="@weight_decay"),
                    "warmup_epochs": tpp.warmup_epochs[1], "dino": dict(DINO_3D), "mim": {}}  # fmt: skip
        # MIM (and MAE) views are crops of the training patch size, image_size
        pretext_net = {"_target_": "tpp_monai.pretext.build_pretext", "pretext": "@pretext", "encoder": "@network_def",
                       "image_size": "@image_size", "dino": "@dino", "mim": "@mim"}  # fmt: skip
        transforms = comp("tpp_monai.pretext.pretext_transforms", pretext="@pretext", dataset="@dataset_name",
                          pretext_size="@image_size", dino="@dino")  # fmt: skip
        return self._pretrain(settings, self._network_def("@backbone_ckpt", "none", stage="tpp"), pretext_net,
                              transforms, cache_rate="@cache_rate")  # fmt: skip

    def finetune(self) -> dict:
        ft = self.recipe.finetune
        settings = {"lr": self.ft_lr, "momentum": ft.momentum, "weight_decay": ft.weight_decay,
                    "grad_clip": ft.grad_clip, "val_interval": 50}  # fmt: skip
        loss = {"_target_": "DeepSupervisionLoss",
                "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
                "weights": DEEP_SUPERVISION_WEIGHTS}  # fmt: skip
        optimizer = {"_target_": "torch.optim.SGD", "params": "@trainable_params", "lr": "@lr", "momentum": "@momentum",
                     "nesterov": True, "weight_decay": "@weight_decay"}  # fmt: skip
        validate = {"inferer": self._sliding_window(), "postprocessing": self._post(), **self._metrics("val_")}
        return self._finetune(settings, self._network_def("@backbone_ckpt", "@tpp_ckpt"), loss, optimizer,
                              (self._transforms("train"), self._transforms("eval")), validate,
                              cache_rate="@cache_rate")  # fmt: skip

    def evaluate(self) -> dict:
        """The best fine-tuned model on the test split, whole volumes at the training spacing (as MOTS/DoDNet);
        ``metrics.json``, ``metrics.csv`` and ``dice_per_case.csv`` (organ, tumour, mean, organ label 1 per case)."""
        test = {"inferer": self._sliding_window(), "postprocessing": self._post(), **self._metrics("")}
        writers = [
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": "*"},
            {"_target_": "tpp_monai.workflows.PerCaseWriter", "handler": "@test#key_metric#mean_dice",
             "output_dir": "@output_dir"},
        ]  # fmt: skip
        return self._evaluate(test, writers)

    def inference(self) -> dict:
        """A folder of CT volumes in, ``<name>_seg.nii.gz`` label maps (0 background, 1 organ, 2 tumour) out, each
        with its input's affine and shape: softmax probabilities are mapped back through the preprocessing
        (``Invertd``: spacing, orientation; linear, as nnU-Net resamples probabilities) before the argmax."""
        post = self._post(dict(parts.INVERT_PRED))
        post["transforms"].append(comp("nifti_saver", output_dir="@output_dir"))
        transforms = comp("tpp_monai.data.transforms.image_transforms", dataset="@dataset_name")
        return self._inference(self._network_def("none", "none"), transforms, self._sliding_window(), post, [])

    def demo(self) -> dict:
        """``demo.json``: demo NIfTI volumes, ``stunet_tiny`` with random weights, 32^3 patches and DINO crops
        (16 x 32 x 32 local crops), a few epochs: each workflow well under a minute on 2 CPU cores."""
        return {
            "dataset_dir": comp("demo_dataset", dataset="@dataset_name", folder="$@runs_dir + '/demo_data'"),
            "backbone": "stunet_tiny",
            "backbone_ckpt": "none",
            "image_size": list(DEMO_PATCH),
            "tpp_epochs": 3,
            "warmup_epochs": 1,
            "batch_size": 2,
            "iterations": 6,
            "val_interval": 3,
            "num_workers": 0,
            "sw_batch_size": 4,
            "sw_overlap": 0.25,
            "dino": {
                "out_dim": 256,
                "hidden_dim": 64,
                "bottleneck_dim": 32,
                "global_size": list(DEMO_PATCH),
                "local_size": [16, 32, 32],
                "num_local": 2,
            },
        }

    def metadata(self) -> dict:
        return docs.metadata_3d(self)

    def readme(self) -> str:
        return docs.readme_3d(self)
