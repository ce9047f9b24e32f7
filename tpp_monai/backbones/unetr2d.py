"""The MedCoSS UNETR-2D segmentation decoder (methods.md §1.4), built from MONAI's UNETR blocks, on any
:class:`~tpp_monai.backbones.vit.ViTBase`: the encoder's tapped patch tokens become the skip connections."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

UNETR_MODULES = ("encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out")


def build_unetr_decoder(model: nn.Module, in_chans: int, out_channels: int, hidden: int, fs: int) -> None:
    """Attach the MedCoSS UNETR-2D decoder (MONAI blocks, instance norm, residual convs) to ``model``.

    The modules are set directly on the model, so the state-dict keys (``encoder1.*`` ... ``out.*``) are those of the
    MedCoSS GlaS/QaTa checkpoints. 1,893,361 parameters for 3 input channels, 1 output channel, feature size 16.
    """
    common = {"spatial_dims": 2, "norm_name": "instance"}
    model.encoder1 = UnetrBasicBlock(
        in_channels=in_chans, out_channels=fs, kernel_size=3, stride=1, res_block=True, **common
    )
    for name, mult, layers in (("encoder2", 2, 2), ("encoder3", 4, 1), ("encoder4", 8, 0)):
        block = UnetrPrUpBlock(
            in_channels=hidden,
            out_channels=fs * mult,
            num_layer=layers,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=2,
            conv_block=True,
            res_block=True,
            **common,
        )
        setattr(model, name, block)
    for name, cin, cout in (
        ("decoder5", hidden, fs * 8),
        ("decoder4", fs * 8, fs * 4),
        ("decoder3", fs * 4, fs * 2),
        ("decoder2", fs * 2, fs),
    ):
        setattr(
            model,
            name,
            UnetrUpBlock(
                in_channels=cin, out_channels=cout, kernel_size=3, upsample_kernel_size=2, res_block=True, **common
            ),
        )
    model.out = UnetOutBlock(spatial_dims=2, in_channels=fs, out_channels=out_channels)


def unetr_decode(model: nn.Module, image: Tensor, taps: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
    """The decoder's output from the ``image`` and the patch tokens ``taps`` (``[B, N, D]``, ``grid`` patches)."""
    h, w = grid
    x2, x3, x4, last = (t.transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in taps)
    enc1 = model.encoder1(image)
    enc2 = model.encoder2(x2)
    enc3 = model.encoder3(x3)
    enc4 = model.encoder4(x4)
    dec3 = model.decoder5(last, enc4)
    dec2 = model.decoder4(dec3, enc3)
    dec1 = model.decoder3(dec2, enc2)
    return model.out(model.decoder2(dec1, enc1))
