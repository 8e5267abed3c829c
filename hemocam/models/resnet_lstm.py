"""ResNet + bidirectional LSTM slice classifier (the weak-supervision teacher).

Each slice goes through a torchvision ResNet (global-average-pooled features); a bidirectional
LSTM reads the slice features of a scan in order, so every slice's prediction sees its neighbours
(bleeds span slices; the RSNA winners all added such a sequence model over per-slice CNN
embeddings). The head sees the LSTM output concatenated with the slice's own CNN feature (a skip
connection: the CNN evidence is never washed out by the sequence model).

Grad-CAM hooks ``model.encoder.layer4`` (the last ResNet stage).
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

log = logging.getLogger("hemocam")

ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, 2048),
}

BUNDLE_FORMAT = 1


def _hub_weights_file(arch: str) -> Path | None:
    """The torchvision ImageNet file in the torch hub cache, if someone put it there (no download)."""
    url = ARCHS[arch][1].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.exists() else None


def _load_pretrained(encoder: nn.Module, arch: str, pretrained, in_channels: int) -> None:
    if pretrained in (None, "", False, "none"):
        return
    if pretrained in ("imagenet", True):
        path = _hub_weights_file(arch)
        if path is None:
            log.warning("ImageNet weights for %s not in the torch hub cache (%s): random init (nothing is "
                        "downloaded)", arch, Path(torch.hub.get_dir()) / "checkpoints")
            return
    else:
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(f"{path}: pretrained weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] != in_channels:
        # window channels are not RGB: spread the mean filter over the new channel count
        state["conv1.weight"] = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3.0 / in_channels)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not {arch} weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("loaded %s encoder weights from %s", arch, path)


class ResNetLSTM(nn.Module):
    def __init__(
        self,
        arch: str = "resnet34",
        in_channels: int = 3,
        n_labels: int = 6,
        lstm_hidden: int = 256,
        lstm_layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.3,
        pretrained=None,
        zero_init_residual: bool = False,
        encoder_stride: int = 32,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        builder, _, feat = ARCHS[arch]
        self.config = dict(arch=arch, in_channels=int(in_channels), n_labels=int(n_labels),
                           lstm_hidden=int(lstm_hidden), lstm_layers=int(lstm_layers),
                           bidirectional=bool(bidirectional), dropout=float(dropout),
                           encoder_stride=int(encoder_stride))
        if encoder_stride not in (16, 32):
            raise ValueError(f"encoder_stride must be 16 or 32, got {encoder_stride!r}")
        # zero_init_residual (blocks start as identity) was tried: faster first epoch, but on the
        # phantom cohort validation AUC then stalled ~0.1 below the default init; off by default
        enc = builder(weights=None, zero_init_residual=bool(zero_init_residual))
        if in_channels != 3:
            enc.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        enc.fc = nn.Identity()
        if encoder_stride == 16:
            # no stem max-pool: twice the feature-map size, so small and thin bleeds keep more than
            # one layer4 cell, and Grad-CAM gets a 6 x 6 instead of a 3 x 3 map at 96 px
            enc.maxpool = nn.Identity()
        _load_pretrained(enc, arch, pretrained, in_channels)
        self.encoder = enc
        self.feature_dim = feat
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            feat, lstm_hidden, num_layers=lstm_layers, batch_first=True, bidirectional=bidirectional,
            dropout=dropout if lstm_layers > 1 else 0.0,
        )
        out = lstm_hidden * (2 if bidirectional else 1)
        self.head = nn.Linear(out + feat, n_labels)
        # per-slice head on the CNN feature alone: deep supervision during training (the
        # encoder gets a direct, un-mixed gradient per slice); not used for predictions
        self.aux_head = nn.Linear(feat, n_labels)
        self.bucket = 16
        self.encoder_frozen = False

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or release) the CNN: no gradients, BatchNorm statistics kept, no autograd graph.

        The sequence stage after a slice stage trains the LSTM and heads on the slice features the
        first stage learnt; training them jointly from there let the LSTM's slice-position shortcut
        wash the visual features out on small cohorts.
        """
        self.encoder_frozen = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F) pooled ResNet features."""
        if slices.is_cuda:
            slices = slices.contiguous(memory_format=torch.channels_last)
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(slices)
        return self.encoder(slices)

    def sequence(self, feats: torch.Tensor, lengths=None) -> torch.Tensor:
        """(B, T, F) slice features -> (B, T, n_labels) logits; padded steps are not read."""
        B, T, _ = feats.shape
        # the sequence part is tiny: run it in fp32 outside autocast (stable, any packed dtype)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return self._sequence(feats.float(), lengths)

    def _sequence(self, feats, lengths):
        B, T, _ = feats.shape
        x = self.drop(feats)
        if lengths is not None and not bool((torch.as_tensor(lengths) == T).all()):
            lengths_cpu = torch.as_tensor(lengths, dtype=torch.long).cpu().clamp(min=1)
            packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = pad_packed_sequence(y, batch_first=True, total_length=T)
        else:
            y, _ = self.lstm(x)
        y = torch.cat([self.drop(y), x], dim=-1)
        return self.head(y)

    def forward(self, x: torch.Tensor, lengths=None, return_aux: bool = False):
        """x: (B, T, C, H, W) scans (padded to T); lengths: real slice counts (B,) or None.

        Returns logits (B, T, n_labels); with ``return_aux`` also the per-slice CNN-only logits.
        """
        if x.ndim != 5:
            raise ValueError(f"expected (B, T, C, H, W), got shape {tuple(x.shape)}")
        B, T = x.shape[:2]
        flat = x.reshape(B * T, *x.shape[2:])
        if lengths is None:
            feats = self.encode(flat)
        else:
            lengths_t = torch.as_tensor(lengths, dtype=torch.long).cpu()
            valid = (torch.arange(T)[None, :] < lengths_t[:, None]).reshape(-1)
            idx = torch.nonzero(valid).squeeze(1)
            n = len(idx)
            if self.training and x.is_cuda and self.bucket > 1 and n % self.bucket:
                # training batches hold a varying number of real slices; with cudnn.benchmark
                # every new count would be re-tuned. Round up to a multiple of ``bucket`` by
                # repeating real slices (their outputs are dropped) so few shapes ever occur.
                idx = torch.cat([idx, idx[: (-n) % self.bucket].repeat(self.bucket)[: (-n) % self.bucket]])
            idx = idx.to(x.device)
            # padded slices are not pushed through the CNN (saves compute, keeps BN stats clean)
            f = self.encode(flat.index_select(0, idx))[:n]
            feats = f.new_zeros(B * T, f.shape[-1])
            feats[idx[:n]] = f
        feats = feats.reshape(B, T, -1)
        logits = self.sequence(feats, lengths)
        if return_aux:
            return logits, self.aux_head(self.drop(feats.float()))
        return logits


class ResNetLSTMEnsemble(nn.Module):
    """Members trained alike from different seeds; it predicts their mean probability.

    On 40-scan cohorts one model's test AUC moves by +-0.005 with its seed alone; the RSNA winners
    averaged several models. ``forward`` returns the logit of the mean probability, so code that
    takes logits takes an ensemble too. The CAM stage takes member 0's Grad-CAM or the members'
    mean (``cam.members``, :func:`hemocam.cam.ensemble_cams`).
    """

    def __init__(self, members):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.config = dict(members[0].config)

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x, lengths).float()) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-7)


def members(model: nn.Module) -> list[ResNetLSTM]:
    """The models whose predictions a classifier averages: its members, or the model itself."""
    return list(model.members) if isinstance(model, ResNetLSTMEnsemble) else [model]


# ----------------------------------------------------------------------------- bundles
def versions() -> dict:
    import hemocam

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "hemocam": hemocam.__version__, "python": platform.python_version()}


def _plain(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"bundle meta value of type {type(obj).__name__} is not JSON-like")


def save_bundle(path, model: ResNetLSTM | ResNetLSTMEnsemble, meta: dict) -> None:
    """Write the self-describing classifier bundle: weights + everything to rebuild and use it.

    ``meta`` should hold labels, windows, size, input normalisation, training config, seed, epoch;
    the model hyper-parameters and library versions are added here. An ensemble is its own kind
    (``resnet_lstm_ensemble``, one state dict per member): a version that cannot average members
    refuses it instead of using the first alone.
    """
    from hemocam.io import atomic_path

    # plain JSON types only: the bundle then loads with torch.load(weights_only=True)
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k not in ("state_dict", "model")},
                                  default=_plain))
    weights = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in members(model)]
    bundle = {
        "format": BUNDLE_FORMAT,
        "kind": "resnet_lstm" if len(weights) == 1 else "resnet_lstm_ensemble",
        "model": dict(model.config),
        **({"state_dict": weights[0]} if len(weights) == 1 else {"state_dicts": weights}),
        "versions": versions(),
        **plain,
    }
    if "labels" in bundle and len(bundle["labels"]) != model.config["n_labels"]:
        raise ValueError(f"{len(bundle['labels'])} labels for a model with {model.config['n_labels']} outputs")
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


def load_bundle(path, device=None) -> tuple[ResNetLSTM | ResNetLSTMEnsemble, dict]:
    """Rebuild the model (or ensemble) from a bundle (no pretrained download), in eval mode on ``device``."""
    from hemocam.io import InputError

    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: unreadable classifier bundle ({type(exc).__name__}: {exc})") from exc
    kind = bundle.get("kind")
    if kind not in ("resnet_lstm", "resnet_lstm_ensemble"):
        raise InputError(f"{path}: not a ResNet-LSTM classifier bundle (kind={kind!r})")
    states = [bundle["state_dict"]] if kind == "resnet_lstm" else bundle["state_dicts"]
    nets = []
    for state in states:
        net = ResNetLSTM(**bundle["model"], pretrained=None)
        net.load_state_dict(state)
        nets.append(net)
    model = nets[0] if len(nets) == 1 else ResNetLSTMEnsemble(nets)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    meta = {k: v for k, v in bundle.items() if k not in ("state_dict", "state_dicts")}
    return model, meta
