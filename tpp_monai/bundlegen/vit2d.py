"""The 2D bundles: MedCoSS ViT-B/16 with a PEFT method on the five 2D datasets of the paper (Tables 3, 4)."""

from __future__ import annotations

from tpp_monai.bundlegen import docs, parts
from tpp_monai.bundlegen.base import BundleKind
from tpp_monai.bundlegen.parts import comp

DEMO_IMAGE_SIZE = 64  # the demo overlay: tiny backbone, random weights, demo data, a few epochs on 2 CPU cores


class ViTBundle(BundleKind):
    """A 2D bundle (classification or binary segmentation) on a frozen MedCoSS ViT-B/16."""

    spatial_dims = 2
    backbone = "medcoss_vit_b16"

    @property
    def cls(self) -> bool:
        return self.info.task == "cls"

    def _network_def(self, backbone_ckpt: str, tpp_ckpt: str, classes: str | int | None = None) -> dict:
        num_classes = len(self.info.classes) if classes is None else classes
        task = {"task": "cls", "num_classes": num_classes} if self.cls else {"task": "seg", "out_channels": 1}
        return {"_target_": "tpp_monai.network.build_network", "backbone": "@backbone", **task, "method": "@method",
                "method_options": "@method_options", "backbone_ckpt": backbone_ckpt, "tpp_ckpt": tpp_ckpt,
                "stage": "finetune"}  # fmt: skip

    def _inferer(self, flips: bool = False) -> dict:
        if self.cls:
            return {"_target_": "tpp_monai.inferers.PlainInferer"}
        return {"_target_": "tpp_monai.inferers.SegmentationInferer", "roi_size": "@image_size", "overlap": 0.5,
                "flips": [[2], [3], [2, 3]] if flips else []}  # fmt: skip

    def _postprocessing(self, save_masks: bool = False) -> dict:
        """Softmax probabilities (classification) or masks thresholded at 0.5 (segmentation); ``save_masks`` also
        writes a copy back at the input image's size and geometry, thresholded (the metrics read the network-size
        prediction as before)."""
        if self.cls:
            return {
                "_target_": "Compose",
                "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
            }
        steps: list = [{"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]
        if save_masks:
            steps[:0] = [
                {"_target_": "CopyItemsd", "keys": "pred", "names": "mask"},
                {**parts.INVERT_PRED, "keys": "mask", "transform": "@test#preprocessing"},
                {"_target_": "AsDiscreted", "keys": "mask", "threshold": 0.5},
                comp("mask_saver", output_dir="@output_dir", key="mask", folder="predictions"),
                {"_target_": "DeleteItemsd", "keys": "mask"},
            ]
        return {"_target_": "Compose", "transforms": steps}

    def _metrics(self, prefix: str, test: bool) -> dict:
        """Key and additional metrics: MedCoSS selects by ACC+AUC+F1 (classification) or Dice (segmentation)."""
        if self.cls:
            handler = "tpp_monai.metrics.ClassificationMetricHandler"
            extra = {f"{prefix}{k}": {"_target_": handler, "key": k} for k in ("acc", "auc", "f1")}
            return {
                "key_metric": {f"{prefix}score": {"_target_": handler, "key": "score"}},
                "additional_metrics": extra,
            }
        handler = "tpp_monai.metrics.SegMetricHandler"
        extra = {f"{prefix}hd95": {"_target_": handler, "key": "hd95", "save_details": True}} if test else {}
        return {"key_metric": {f"{prefix}dice": {"_target_": handler, "key": "dice", "save_details": test}},
                "additional_metrics": extra}  # fmt: skip

    def _transforms(self, which: str) -> dict:
        return comp(f"tpp_monai.data.transforms.{which}_transforms", dataset="@dataset_name", image_size="@image_size")

    def pretrain_tpp(self) -> dict:
        tpp = self.recipe.tpp
        settings = {
            "pretext": comp("tpp_monai.pretext.default_pretext", backbone="@backbone"),
            "tpp_epochs": tpp.epochs,
            "epochs": "@tpp_epochs",
            "batch_size": tpp.batch_size,
            "pretext_size": 224,
            # MIM: the paper's TPP rate and schedule (tuned for target parameters), SimMIM's weight decay 0.05
            "lr": comp("pretext_lr", pretext="@pretext", batch_size="@batch_size", mae=tpp.mae_lr,
                       dino_base=tpp.dino_base_lr, mim=tpp.mae_lr),
            "weight_decay": comp("pretext_setting", pretext="@pretext", mae=1.5e-2, dino=0.04, mim=0.05),
            "weight_decay_end": comp("pretext_setting", pretext="@pretext", mae="@weight_decay", dino=0.4,
                                     mim="@weight_decay"),
            "warmup_epochs": comp("pretext_setting", pretext="@pretext", mae=tpp.warmup_epochs[0],
                                  dino=tpp.warmup_epochs[1], mim=tpp.warmup_epochs[0]),
            "mae_decoder": tpp.mae_decoder,
            "mask_ratio": 0.75,
            "dino": {},
            "mim": {},
        }  # fmt: skip
        network_def = {
            "_target_": "tpp_monai.network.build_network",
            "backbone": "@backbone",
            "task": "features",
            "method": "@method",
            "method_options": "@method_options",
            "backbone_ckpt": "@backbone_ckpt",
            "stage": "tpp",
            "keep_mae_decoder": comp("pretext_setting", pretext="@pretext", mae=True, dino=False, mim=False),
        }
        pretext_net = {"_target_": "tpp_monai.pretext.build_pretext", "pretext": "@pretext", "encoder": "@network_def",
                       "image_size": "@pretext_size", "mae_decoder": "@mae_decoder", "mask_ratio": "@mask_ratio",
                       "decoder": comp("mae_decoder_geometry", backbone="@backbone"), "dino": "@dino",
                       "mim": "@mim"}  # fmt: skip
        transforms = comp("tpp_monai.pretext.pretext_transforms", pretext="@pretext", dataset="@dataset_name",
                          pretext_size="@pretext_size", image_size="@image_size", dino="@dino")  # fmt: skip
        return self._pretrain(settings, network_def, pretext_net, transforms)

    def finetune(self) -> dict:
        ft = self.recipe.finetune
        settings = {"lr": self.ft_lr, "weight_decay": ft.weight_decay, "grad_clip": ft.grad_clip, "val_interval": 1,
                    **({"num_classes": len(self.info.classes)} if self.cls else {})}  # fmt: skip
        loss = ({"_target_": "torch.nn.CrossEntropyLoss"} if self.cls
                else {"_target_": "DiceCELoss", "sigmoid": True, "smooth_nr": 1.0, "smooth_dr": 1.0})  # fmt: skip
        optimizer = {"_target_": "torch.optim.AdamW", "params": "@trainable_params", "lr": "@lr",
                     "weight_decay": "@weight_decay", "fused": True}  # fmt: skip
        validate = {
            "inferer": self._inferer(),
            "postprocessing": self._postprocessing(),
            **self._metrics("val_", False),
        }
        return self._finetune(settings, self._network_def("@backbone_ckpt", "@tpp_ckpt", "@num_classes" if self.cls
                                                          else None), loss, optimizer,
                              (self._transforms("train"), self._transforms("eval")), validate)  # fmt: skip

    def _classification_saver(self) -> dict:
        return {"_target_": "tpp_monai.writers.ClassificationWriter", "output_dir": "@output_dir",
                "dataset": "@dataset_name"}  # fmt: skip

    def evaluate(self) -> dict:
        test = {
            "inferer": self._inferer(flips=self.info.flip_tta),
            "postprocessing": self._postprocessing(save_masks=not self.cls),
            **self._metrics("", True),
        }
        writers = [{"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": "*", "metric_details": "*",
                    "batch_transform": parts.IMAGE_META, "summary_ops": "*"}]  # fmt: skip
        if self.cls:
            writers.append(self._classification_saver())
        return self._evaluate(test, writers)

    def inference(self) -> dict:
        post = self._postprocessing()
        if self.cls:
            writers = [self._classification_saver()]
        else:
            # back to each input's own size (the resize of the preprocessing undone) before thresholding and saving
            post["transforms"] = [
                dict(parts.INVERT_PRED),
                *post["transforms"],
                comp("mask_saver", output_dir="@output_dir"),
            ]
            writers = []
        transforms = comp(
            "tpp_monai.data.transforms.image_transforms", dataset="@dataset_name", image_size="@image_size"
        )
        return self._inference(self._network_def("none", "none"), transforms,
                               self._inferer(flips=self.info.flip_tta), post, writers)  # fmt: skip

    def demo(self) -> dict:
        """``demo.json``: overlay for the demo data, a tiny random backbone and a few epochs (about a minute)."""
        size = DEMO_IMAGE_SIZE
        return {
            "dataset_dir": comp("demo_dataset", dataset="@dataset_name", folder="$@runs_dir + '/demo_data'"),
            "backbone": "medcoss_vit_tiny",
            "backbone_ckpt": "none",
            "image_size": [size, size],
            "pretext_size": size,
            "tpp_epochs": 60,
            "iterations": 150,
            "val_interval": 5,
            "batch_size": 4,
            "warmup_epochs": 2,
            "mae_decoder": "random",
            "num_workers": 0,
            "dino": {
                "out_dim": 1024,
                "hidden_dim": 256,
                "bottleneck_dim": 64,
                "global_size": size,
                "local_size": 32,
                "num_local": 2,
            },
            "mim": {"mask_patch": 16},  # 16 cells of the 64 x 64 demo images, 10 masked
        }

    def metadata(self) -> dict:
        return docs.metadata_2d(self)

    def readme(self) -> str:
        return docs.readme_2d(self)
