"""The files a bundle ships beside its configs and docs: ``LICENSE`` and ``large_files.yml`` (the backbone
checkpoints by their public source; none is redistributed)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Where each backbone's pre-trained checkpoint is published (no file is redistributed here).
CHECKPOINTS = {
    "medcoss_vit_b16": {
        "path": "models/backbone/checkpoint-299.pth",
        "url": "https://drive.google.com/drive/folders/15RlO7l8njzqCt4ccXIwBIjPXZo94Z118",
        "source": "MedCoSS (Ye et al., CVPR 2024), README of https://github.com/yeerwen/MedCoSS, 'Pre-trained Model': "
        "folder MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05",
        "hash_note": "only a Google Drive folder is public (no direct file link) and MedCoSS states no digest",
    },
    "path_dino_vit_s16": {
        "path": "models/backbone/dino_vit_small_patch16_ep200.torch",
        "url": "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
        "dino_vit_small_patch16_ep200.torch",
        "source": "Path_DINO ViT-S/16 (Kang et al., CVPR 2023), release 'pretrained-weights' of "
        "https://github.com/lunit-io/benchmark-ssl-pathology (the paper's Table 9 backbone)",
        "hash_note": "the release states no digest",
    },
    "stunet_b": {
        "path": "models/backbone/base_ep4k.model",
        "url": "https://drive.google.com/file/d/1BHCp1Ort-OaVFwaZmvsG4qHiKiPeNb4h/view?usp=share_link",
        "source": "STU-Net-B trained on TotalSegmentator (Huang et al., 2023), README of "
        "https://github.com/uni-medical/STU-Net ('Pre-trained Models'; also on Baidu Netdisk "
        "https://pan.baidu.com/s/1a17XmOGiGSgbEvK-acSOSg?pwd=91w3)",
        "hash_note": "a Google Drive file whose digest STU-Net does not state",
    },
    "swinunetr": {
        "path": "models/backbone/model.pt",
        "url": "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/"
        "model_swin_unetr_btcv_segmentation_v1.pt",
        "hash_val": "50dd67a01b28a1d5487fd9ac27e682fb",
        "hash_type": "md5",
        "source": "MONAI model zoo swin_unetr_btcv_segmentation (BTCV, 13 organs; Hatamizadeh et al.), its "
        "large_files.yml entry models/model.pt",
    },
    "model_swinvit": {
        "path": "models/backbone/model_swinvit.pt",
        "url": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
        "source": "self-supervised Swin encoder of Tang et al. (CVPR 2022), linked from "
        "https://github.com/Project-MONAI/research-contributions (SwinUNETR/Pretrain); the decoder starts random",
        "hash_note": "the release states no digest",
    },
}
# other checkpoints a bundle's README names
EXTRA_CHECKPOINTS = {"medcoss_vit_b16": ("path_dino_vit_s16",), "swinunetr": ("model_swinvit",)}


def license_text() -> str:
    """The project's licence (Apache-2.0, ``pyproject.toml``), as at the repository root."""
    return (REPO / "LICENSE").read_text()


def large_files(backbone: str) -> str:
    """``large_files.yml`` in model-zoo's format: the backbone checkpoints by their public source, with the hash
    where the publisher states one (``hash_val``/``hash_type``), else empty with a comment saying why."""
    lines = ["# Pre-trained backbone checkpoints (not redistributed); pass the file with --backbone_ckpt.",
             "large_files:"]  # fmt: skip
    for name in (backbone, *EXTRA_CHECKPOINTS.get(backbone, ())):
        entry = CHECKPOINTS[name]
        lines += [f"  - path: \"{entry['path']}\"", f"    url: \"{entry['url']}\"",
                  f"    hash_val: \"{entry.get('hash_val', '')}\"", f"    hash_type: \"{entry.get('hash_type', '')}\"",
                  f"    # {name}: {entry['source']}"]  # fmt: skip
        if not entry.get("hash_val"):
            lines.append(f"    # no hash: {entry['hash_note']}")
    return "\n".join(lines) + "\n"
