"""TPP with MAE (paper §3.2, §4.2): the frozen backbone and its target parameters encode the visible 25 % of
patches, a decoder reconstructs the masked ones, and the loss is the MSE on masked patches against per-patch
normalised pixels (MedCoSS ``Unified_Model.forward_loss`` with ``norm_pix_loss``).

Any backbone that drops tokens (``tokens:drop`` in :mod:`tpp_monai.contract`) feeds it: the patch size, width,
channels and spatial dims come from its ``interface()``, and the number of prefix tokens (0, 1 or more) from one
probe of ``forward_features`` when the pretext is built. Prefix tokens go through the decoder and are not predicted.

The decoder is random (``mae_decoder: random``) or inherited from the backbone checkpoint (``freeze``/``update``; the
paper freezes it for classification and updates it for segmentation, §5.5). ``build_network(keep_mae_decoder=True)``
puts the checkpoint's decoder tensors on ``encoder.mae_checkpoint``; two key layouts are accepted, told apart by
their keys, and the decoder's width, depth, MLP width and q/k/v bias are read from the tensors (the head count, which
no tensor shows, from the backbone spec's ``mae_decoder``):

* **MedCoSS** (``Unified_Model``, 2D): ``decoder_embed.{weight,bias}``, ``mask_token [1, 1, d]``,
  ``decoder_pos_embed_2D [1, P + N, d]`` (a row per prefix token first), ``decoder_blocks.{i}.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}.*`` (timm blocks), ``decoder_norm.*``, ``decoder_pred_2D.*`` (``d -> p*p*C``).
* **MONAI** ``MaskedAutoEncoderViT`` (2D or 3D), the names of its ``state_dict()``: ``decoder_embed.*``,
  ``mask_tokens [1, 1, d]``, ``decoder_pos_embedding [1, N, d]`` (patches only; prefix tokens get none),
  ``decoder_blocks.{i}.{norm1, attn.qkv, attn.out_proj, norm2, mlp.linear1, mlp.linear2}.*`` (MONAI
  ``TransformerBlock``; ``norm_cross_attn.*`` may be absent and older MONAI's ``cross_attn.*`` is ignored),
  ``decoder_blocks.{depth}.*`` (the final LayerNorm), ``decoder_pred.*`` (``d -> prod(p)*C``).

Both predict each patch's pixels in the order (patch rows, cols[, slices], channel) over the patch grid in raster
order (:func:`patchify`; MONAI's ``perceptron`` patch embedding flattens the same way). A ``cls_token`` among the
tensors is ignored. A random decoder takes the MedCoSS layout in 2D and MONAI's in 3D.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tpp_monai.backbones.checkpoint import load_into
from tpp_monai.backbones.timm_vit import TimmBlock
from tpp_monai.backbones.vit import run_block
from tpp_monai.errors import ConfigError

DECODER_MODES = ("random", "freeze", "update")
DECODER_LAYOUTS = ("medcoss", "monai")


def as_size(size: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    """An int (square / cube) or ``dims`` positive ints as a tuple."""
    out = (int(size),) * dims if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(out) != dims or min(out) < 1:
        raise ConfigError(f"{what} must be an int or {dims} positive ints for a {dims}D backbone, got {size!r}")
    return out


def patchify(images: Tensor, patch: int | Sequence[int]) -> Tensor:
    """``[B, C, *S]`` -> ``[B, N, prod(p)*C]``: patches in raster order, pixels ordered (row, col[, slice], channel)
    within a patch (MedCoSS's 2D order, generalised)."""
    b, c, *spatial = images.shape
    patch = as_size(patch, len(spatial), "patch size")
    grid = [s // p for s, p in zip(spatial, patch)]
    x = images.reshape(b, c, *(v for g, p in zip(grid, patch) for v in (g, p)))
    d = len(spatial)
    x = x.permute(0, *(2 + 2 * i for i in range(d)), *(3 + 2 * i for i in range(d)), 1)  # b, grid..., patch..., c
    return x.reshape(b, math.prod(grid), math.prod(patch) * c)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, ...]:
    """Per-sample random masking by argsort of noise (MAE). Returns ``keep_idx [B, n]``, ``ids_restore [B, N]`` and
    ``mask [B, N]`` (1 = masked)."""
    keep = int(num_patches * (1 - mask_ratio))
    if not 0 < keep < num_patches:
        raise ConfigError(f"mask_ratio {mask_ratio} leaves {keep} of {num_patches} patches visible; use 0 < ratio < 1")
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def sincos_2d(dim: int, grid: int | Sequence[int]) -> Tensor:
    """MAE's 2D sine-cosine position table ``[rows * cols, dim]`` (half the channels for rows, half for columns).

    A decoder whose position table starts at zeros, as MedCoSS's, sees every mask token alike until that table
    has been learnt; this start gives the hidden positions distinct queries from the first step. (It did not move the
    demo's flat TPP loss: there the hidden patches' normalised pixels are not predicted at the demo's budget, see
    ``tpp_monai.data.synthetic``.)
    """
    if dim % 4:
        raise ConfigError(f"MAE decoder width {dim} must be a multiple of 4 for the 2D sin-cos position table")
    h, w = as_size(grid, 2, "grid")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def _unshuffle(visible: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Visible tokens (shuffled order) + mask tokens -> ``[B, N, d]`` in patch order."""
    b, n = visible.shape[0], ids_restore.shape[1]
    patches = torch.cat([visible, mask_token.expand(b, n - visible.shape[1], -1)], dim=1)
    return torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, visible.shape[-1]))


class MAEDecoder(nn.Module):
    """The MedCoSS MAE decoder (2D), with its checkpoint parameter names; ``num_prefix`` rows of the position table
    belong to the prefix tokens (1 in MedCoSS)."""

    activation_checkpointing: bool = False  # see tpp_monai.backbones.vit.set_activation_checkpointing
    layout = "medcoss"

    def __init__(
        self, embed_dim: int, num_patches: int, dim: int = 512, depth: int = 8, heads: int = 16,
        patch: int | Sequence[int] = 16, in_chans: int = 3, num_prefix: int = 1, mlp_dim: int | None = None,
        grid: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_patches, self.num_prefix = num_patches, num_prefix
        pixels = math.prod(as_size(patch, 2, "MAE patch size")) * in_chans
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed_2D = nn.Parameter(torch.zeros(1, num_patches + num_prefix, dim))
        self.decoder_blocks = nn.ModuleList(TimmBlock(dim, heads, mlp_dim or 4 * dim) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred_2D = nn.Linear(dim, pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():  # MAE's fixed 2D sin-cos table as the start of MedCoSS's learned one (zeros there)
            self.decoder_pos_embed_2D[0, num_prefix:] = sincos_2d(dim, grid or round(num_patches**0.5))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def load_inherited(self, tensors: Mapping[str, Tensor], source: str = "the backbone checkpoint") -> None:
        """Copy the decoder tensors of a MedCoSS pre-training checkpoint (kept by ``build_network``)."""
        state = _decoder_tensors(tensors, source)
        load_into(self, state, [k for k, _ in self.named_parameters()], {}, path=source)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens [B, P + n, D]`` (prefix + visible patches, shuffled order) -> ``[B, N, prod(p)*C]``."""
        x = self.decoder_embed(tokens)
        p = self.num_prefix
        x = torch.cat([x[:, :p], _unshuffle(x[:, p:], self.mask_token, ids_restore)], dim=1) + self.decoder_pos_embed_2D
        ckpt = self.activation_checkpointing and self.training
        for block in self.decoder_blocks:
            x = run_block(block, x, ckpt)
        return self.decoder_pred_2D(self.decoder_norm(x))[:, p:]


class MONAIMAEDecoder(nn.Module):
    """The decoder of MONAI's ``MaskedAutoEncoderViT`` (2D or 3D; MONAI ``TransformerBlock``s), its parameter names.

    The position table is MONAI's fixed sin-cos one (``decoder_pos_embed_type="sincos"``, MONAI's default), not
    trained; an inherited table is loaded as it is and stays fixed too.
    """

    activation_checkpointing: bool = False
    layout = "monai"

    def __init__(
        self, embed_dim: int, grid: Sequence[int], dim: int = 384, depth: int = 4, heads: int = 12,
        patch: Sequence[int] = (16, 16, 16), in_chans: int = 1, num_prefix: int = 1, mlp_dim: int | None = None,
        qkv_bias: bool = False,
    ) -> None:  # fmt: skip
        from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
        from monai.networks.blocks.transformerblock import TransformerBlock
        from monai.networks.layers import trunc_normal_

        super().__init__()
        grid = tuple(int(g) for g in grid)
        self.num_patches, self.num_prefix = math.prod(grid), num_prefix
        per_axis = 4 if len(grid) == 2 else 6
        if dim % per_axis:
            raise ConfigError(f"MAE decoder width {dim} must be a multiple of {per_axis} for the {len(grid)}D sin-cos "
                              "position table (set dim in the backbone's mae_decoder)")  # fmt: skip
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embedding = build_sincos_position_embedding(list(grid), dim, len(grid))
        blocks = [TransformerBlock(dim, mlp_dim or 4 * dim, heads, qkv_bias=qkv_bias, use_flash_attention=True)
                  for _ in range(depth)]  # fmt: skip
        self.decoder_blocks = nn.Sequential(*blocks, nn.LayerNorm(dim))
        self.decoder_pred = nn.Linear(dim, math.prod(patch) * in_chans)
        trunc_normal_(self.mask_tokens, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def load_inherited(self, tensors: Mapping[str, Tensor], source: str = "the backbone checkpoint") -> None:
        """Copy the decoder tensors of a MONAI ``MaskedAutoEncoderViT`` state dict."""
        state = _decoder_tensors(tensors, source)
        depth = len(self.decoder_blocks) - 1
        expected = [k for k, _ in self.named_parameters() if ".norm_cross_attn." not in k or k in state]
        stale = tuple(f"decoder_blocks.{i}.cross_attn." for i in range(depth))
        unused = {"cross-attention of older MONAI blocks": stale}
        load_into(self, state, expected, unused, path=source)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens [B, P + n, D]`` (prefix + visible patches, shuffled order) -> ``[B, N, prod(p)*C]``."""
        x = self.decoder_embed(tokens)
        p = self.num_prefix
        patches = _unshuffle(x[:, p:], self.mask_tokens, ids_restore) + self.decoder_pos_embedding
        x = torch.cat([x[:, :p], patches], dim=1)
        ckpt = self.activation_checkpointing and self.training
        for block in self.decoder_blocks:
            x = run_block(block, x, ckpt)
        return self.decoder_pred(x)[:, p:]


def _decoder_tensors(tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    state = {k: v for k, v in tensors.items() if k != "cls_token"}
    if not state:
        raise ConfigError(
            f"{source} holds no MAE decoder to inherit; use mae_decoder 'random' (trains a new decoder), or pass a "
            "checkpoint that holds one (MedCoSS's pre-training checkpoint-299.pth, a MONAI MaskedAutoEncoderViT)"
        )
    return state


def decoder_layout(tensors: Mapping[str, Tensor]) -> str | None:
    """``"medcoss"`` or ``"monai"`` by the keys of a checkpoint's decoder tensors (``None``: neither)."""
    if "decoder_pos_embed_2D" in tensors or "decoder_pred_2D.weight" in tensors:
        return "medcoss"
    if "decoder_pos_embedding" in tensors or "mask_tokens" in tensors or "decoder_pred.weight" in tensors:
        return "monai"
    return None


def _inherited_geometry(tensors: Mapping[str, Tensor], layout: str, heads: int, source: str) -> dict:
    """Width, depth, MLP width and q/k/v bias of a checkpoint's decoder, read from its tensors."""
    fc1 = "mlp.fc1" if layout == "medcoss" else "mlp.linear1"
    try:
        dim = int(tensors["decoder_embed.weight"].shape[0])
        depth = len({k.split(".")[1] for k in tensors if k.startswith("decoder_blocks.") and f".{fc1}." in k})
        mlp = int(tensors[f"decoder_blocks.0.{fc1}.weight"].shape[0])
    except KeyError as err:
        raise ConfigError(f"the MAE decoder tensors of {source} ({layout} layout) lack {err.args[0]!r}") from None
    if dim % int(heads):
        raise ConfigError(f"the inherited MAE decoder of {source} is {dim} wide, not divisible by {heads} heads; set "
                          "heads in the backbone spec's mae_decoder to a divisor of it")  # fmt: skip
    out = {"dim": dim, "depth": depth, "heads": int(heads), "mlp_dim": mlp}
    if layout == "monai":
        out["qkv_bias"] = "decoder_blocks.0.attn.qkv.bias" in tensors
    return out


def _check_inherited(tensors: Mapping[str, Tensor], layout: str, width: int, pixels: int, rows: int,
                     source: str) -> None:  # fmt: skip
    """Errors that name what the inherited decoder was trained for and what this pretext gives."""
    embed = tensors["decoder_embed.weight"]
    if int(embed.shape[1]) != width:
        raise ConfigError(f"the inherited MAE decoder of {source} reads {embed.shape[1]}-wide tokens but the backbone "
                          f"gives {width}; check that --backbone names the checkpoint's architecture")  # fmt: skip
    pred = tensors.get("decoder_pred_2D.weight" if layout == "medcoss" else "decoder_pred.weight")
    if pred is not None and int(pred.shape[0]) != pixels:
        raise ConfigError(f"the inherited MAE decoder of {source} predicts {pred.shape[0]} values per patch but the "
                          f"backbone's patches hold {pixels} (patch pixels x channels)")  # fmt: skip
    pos = tensors.get("decoder_pos_embed_2D" if layout == "medcoss" else "decoder_pos_embedding")
    if pos is not None and int(pos.shape[1]) != rows:
        what = "prefix tokens + patches" if layout == "medcoss" else "patches"
        raise ConfigError(
            f"the inherited MAE decoder of {source} was trained for {pos.shape[1]} {what} but the pretext images "
            f"give {rows}; set the pretext image size to the one it was trained at (MedCoSS: 224x224, 14x14 patches "
            "and the class token)"
        )


def probe_tokens(encoder: nn.Module, size: Sequence[int]) -> tuple[int, int]:
    """``(num_prefix, width)`` of ``encoder.forward_features`` on a masked input: one small forward (one visible
    patch, evaluation mode, no gradient), with the random state restored so the probe changes no later draw."""
    iface = encoder.interface()
    was_training = encoder.training
    device = next(encoder.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        encoder.eval()
        try:
            x = torch.zeros(1, iface.in_channels, *size, device=device)
            out = encoder.forward_features(x, keep_idx=torch.zeros(1, 1, dtype=torch.long, device=device))
        finally:
            encoder.train(was_training)
    tokens = out.tokens
    if tokens.ndim != 3 or tokens.shape[1] != out.num_prefix + 1:
        raise ConfigError(
            f"{type(encoder).__name__}.forward_features(keep_idx=...) gave tokens of shape {tuple(tokens.shape)} for "
            f"one kept patch and {out.num_prefix} prefix tokens; the MAE pretext needs [B, prefix + kept, D]"
        )
    return int(out.num_prefix), int(tokens.shape[-1])


class MAEPretext(nn.Module):
    """Encoder (backbone + PEFT, task ``features``) + MAE decoder. ``forward(images) -> (pred, mask)``.

    Args:
        encoder: a backbone with ``tokens:drop`` (built with ``task="features"``; its prefix tokens, if any, go
            through the decoder as MedCoSS's class token does).
        decoder_mode: ``"freeze"``/``"update"`` inherit the decoder from ``encoder.mae_checkpoint`` (module
            docstring: the key layouts); ``"random"`` trains a new one.
        image_size: pretext input size, an int (square / cube) or one per axis, a multiple of the patch size.
        mask_ratio: fraction of patches hidden from the encoder (0.75).
        decoder: ``dim``, ``depth``, ``heads`` of a random decoder (the backbone spec's ``mae_decoder``); an inherited
            decoder takes its geometry from its tensors and the head count from here.
    """

    def __init__(
        self, encoder: nn.Module, decoder_mode: str, image_size: int | Sequence[int], mask_ratio: float = 0.75,
        decoder: Mapping | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise ConfigError(f"unknown mae_decoder {decoder_mode!r}; valid: {', '.join(DECODER_MODES)}")
        iface = encoder.interface()
        size = as_size(image_size, iface.spatial_dims, "MAE image size")
        self.patch = tuple(int(p) for p in iface.patch_size)
        if any(s % p for s, p in zip(size, self.patch)):
            raise ConfigError(f"MAE image size {list(size)} is not a multiple of the patch size {list(self.patch)}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.decoder_mode = decoder_mode
        self.grid = tuple(s // p for s, p in zip(size, self.patch))
        num_prefix, width = probe_tokens(encoder, size)
        pixels = math.prod(self.patch) * iface.in_channels
        geometry = {"dim": 512, "depth": 8, "heads": 16, **dict(decoder or {})}
        common = {"patch": self.patch, "in_chans": iface.in_channels, "num_prefix": num_prefix}
        if decoder_mode == "random":
            layout = "medcoss" if iface.spatial_dims == 2 else "monai"
            tensors: Mapping[str, Tensor] = {}
        else:
            tensors = getattr(encoder, "mae_checkpoint", {}) or {}
            state = _decoder_tensors(tensors, "the backbone checkpoint")
            layout = decoder_layout(state)
            if layout is None:
                raise ConfigError(
                    f"the backbone checkpoint's MAE decoder tensors ({', '.join(sorted(state)[:6])}...) are in "
                    f"neither accepted layout ({', '.join(DECODER_LAYOUTS)}: tpp_monai.pretext.mae); use mae_decoder "
                    "'random'"
                )
            rows = math.prod(self.grid) + (num_prefix if layout == "medcoss" else 0)
            _check_inherited(state, layout, width, pixels, rows, "the backbone checkpoint")
            geometry = _inherited_geometry(state, layout, geometry["heads"], "the backbone checkpoint")
        if layout == "medcoss":
            if iface.spatial_dims != 2:
                raise ConfigError("the MedCoSS MAE decoder is 2D; a 3D backbone inherits a MONAI one or uses random")
            geometry.pop("qkv_bias", None)
            self.decoder: nn.Module = MAEDecoder(width, math.prod(self.grid), grid=self.grid, **common, **geometry)
        else:
            self.decoder = MONAIMAEDecoder(width, self.grid, **common, **geometry)
        if tensors:
            self.decoder.load_inherited(tensors)
        self.decoder.requires_grad_(decoder_mode != "freeze")
        if layout == "monai":
            self.decoder.decoder_pos_embedding.requires_grad_(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b = images.shape[0]
        n = math.prod(s // p for s, p in zip(images.shape[2:], self.patch))
        keep, ids_restore, mask = random_masking(b, n, self.mask_ratio, images.device)
        tokens = self.encoder.forward_features(images, keep_idx=keep).tokens
        return self.decoder(tokens, ids_restore), mask

    def pretext_state_names(self) -> list[str]:
        """Tensors besides the target parameters that a resume needs: the decoder when it is trained."""
        if self.decoder_mode == "freeze":
            return []
        return [f"decoder.{n}" for n, p in self.decoder.named_parameters() if p.requires_grad]


class MaskedPatchLoss(nn.Module):
    """MSE on the masked patches; targets normalised per patch by their mean and variance (``norm_pix_loss``)."""

    def __init__(self, patch: int | Sequence[int], norm_pix: bool = True) -> None:
        super().__init__()
        self.patch = patch
        self.norm_pix = norm_pix

    def forward(self, output: tuple[Tensor, Tensor], images: Tensor) -> Tensor:
        pred, mask = output
        target = patchify(images, self.patch)
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N], per patch
        return (loss * mask).sum() / mask.sum()
