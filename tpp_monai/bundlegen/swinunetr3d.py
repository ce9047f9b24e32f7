"""The 3D SwinUNETR bundles: MONAI's SwinUNETR (the model zoo's BTCV weights or Tang et al.'s self-supervised
encoder) with huggingface peft's LoRA and DINO target-parameter pre-training on LiTS and KiTS19, and their full
fine-tuning baselines.

The data, sliding-window evaluation, organ/tumour metrics and inference are those of the STU-Net bundles
(:mod:`tpp_monai.bundlegen.stunet3d`). What differs: backbone ``swinunetr`` (feature size 48, patches of multiples of
32), one output (no deep supervision: Dice + CE on the logits), AdamW as the SwinUNETR authors fine-tune, and DINO on
the pooled deepest Swin stage (its global feature) with crops that are multiples of 32.
"""

from __future__ import annotations

from tpp_monai.bundlegen import docs
from tpp_monai.bundlegen.stunet3d import STUNetBundle

# DINO crops (x, y, z): multiples of SwinUNETR's 32 (patch 2, four 2x mergings)
DINO_SWIN = {"global_size": [96, 96, 64], "local_size": [64, 64, 32], "num_local": 4}
DEMO_PATCH = [32, 32, 64]  # the smallest patch SwinUNETR segments: 1 x 1 x 2 voxels at the deepest stage
#: Fine-tuning rates: LoRA trains from a zero start (as peft's default), full fine-tuning moves pre-trained weights.
LR = {"peft.lora": 1e-3, "full_finetune": 1e-4}
METHODS = tuple(LR)


class SwinUNETRBundle(STUNetBundle):
    """A 3D organ + tumour segmentation bundle on MONAI's SwinUNETR."""

    backbone = "swinunetr"
    dino_crops = DINO_SWIN

    def finetune_lr(self) -> float:
        return LR[self.method]

    @property
    def name(self) -> str:
        return f"{self.info.name}_swinunetr_{self.method.removeprefix('peft.')}"

    def _common(self, workflow: str) -> dict:
        cfg = super()._common(workflow)
        cfg["backbone_options"] = {}
        return cfg

    def pretrain_tpp(self) -> dict:
        cfg = super().pretrain_tpp()
        # DINO, the paper's pretext for 3D (Table 10), not the Swin backbone's default MIM: MIM's cells are at least
        # the 32-voxel Swin stride, so the demo's 32x32x64 patches would hold only two; --pretext mim still selects it
        cfg["pretext"] = "dino"
        cfg["dino"] = dict(DINO_SWIN)
        return cfg

    def finetune(self) -> dict:
        cfg = super().finetune()
        cfg["loss"] = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True}
        cfg["optimizer"] = {"_target_": "torch.optim.AdamW", "params": "@trainable_params", "lr": "@lr",
                            "weight_decay": "@weight_decay"}  # fmt: skip
        cfg["weight_decay"] = 1e-5
        return cfg

    def demo(self) -> dict:
        """``demo.json``: ``swinunetr_tiny`` with random weights, 32 x 32 x 64 patches and DINO crops."""
        cfg = super().demo()
        cfg.update({"backbone": "swinunetr_tiny", "image_size": list(DEMO_PATCH), "sw_batch_size": 2})
        # a teacher that follows the student within the demo's few iterations (DINO's 0.996 barely moves it in 16)
        # and a smaller prototype layer, for the tiny random-weight encoder
        cfg["dino"] = {**cfg["dino"], "global_size": list(DEMO_PATCH), "local_size": [32, 32, 32], "out_dim": 64,
                       "momentum_teacher": 0.9}  # fmt: skip
        return cfg

    def metadata(self) -> dict:
        meta = docs.metadata_3d(self)
        stage = "baseline, no TPP stage" if self.baseline else "TPP (DINO) pre-trains the LoRA factors first"
        meta["description"] = (
            f"{self.method} on MONAI's SwinUNETR for {self.info.title} {self.info.classes[1]} and tumour "
            f"segmentation; {stage}"
        )
        meta["references"] = [meta["references"][0],
                              "Hatamizadeh et al., Swin UNETR: Swin Transformers for Semantic Segmentation of Brain "
                              "Tumors in MRI Images, 2022",
                              "Tang et al., Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image "
                              "Analysis, CVPR 2022",
                              "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"]  # fmt: skip
        return meta

    def readme(self) -> str:
        return docs.readme_swinunetr(self)


__all__ = ["DINO_SWIN", "METHODS", "SwinUNETRBundle"]
