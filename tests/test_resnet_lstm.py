"""ResNet-LSTM: shapes, padding, Grad-CAM layer, bundles, local-only pretrained weights."""

import pytest
import torch
import torchvision

from hemocam.io import InputError
from hemocam.models.resnet_lstm import ResNetLSTM, ResNetLSTMEnsemble, load_bundle, members, save_bundle


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNetLSTM("resnet18", in_channels=3, n_labels=6, lstm_hidden=16, lstm_layers=2).eval()


def test_shapes_and_padding(model):
    x = torch.randn(3, 7, 3, 32, 32)
    with torch.no_grad():
        y = model(x, lengths=[7, 4, 1])
        assert y.shape == (3, 7, 6)
        # a padded scan gives exactly what the unpadded scan alone gives
        alone = model(x[1:2, :4])
        assert torch.allclose(y[1, :4], alone[0], atol=1e-5)
        assert torch.allclose(model(x[2:3, :1])[0], y[2, :1], atol=1e-5)
        # padding content is never read
        x2 = x.clone()
        x2[1, 4:] = 100.0
        assert torch.allclose(model(x2, lengths=[7, 4, 1])[1, :4], y[1, :4], atol=1e-5)
        logits, aux = model(x, lengths=[7, 4, 1], return_aux=True)
        assert aux.shape == (3, 7, 6) and torch.equal(logits, y)
    # the context matters: changing one slice changes its neighbours' logits (bidirectional LSTM)
    x3 = x[:1].clone()
    x3[0, 3] += 1.0
    with torch.no_grad():
        d = (model(x3) - model(x[:1])).abs().sum(-1)[0]
    assert d[2] > 0 and d[4] > 0


def test_gradcam_layer_reachable_and_channels():
    m = ResNetLSTM("resnet34", in_channels=2, n_labels=1, lstm_hidden=8, lstm_layers=1, bidirectional=False)
    assert isinstance(m.encoder.layer4, torch.nn.Sequential)
    assert dict(m.named_modules())["encoder.layer4"] is m.encoder.layer4
    assert m(torch.randn(1, 3, 2, 32, 32)).shape == (1, 3, 1)
    with pytest.raises(ValueError):
        ResNetLSTM("vgg16")
    with pytest.raises(ValueError):
        m(torch.randn(3, 2, 32, 32))


def test_bundle_round_trip(tmp_path, model):
    meta = {"labels": ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"],
            "windows": [{"name": "brain", "center": 40, "width": 80}], "size": 32, "seed": 3, "epoch": 5,
            "config": {"classifier": {"lr": 1e-3}}, "input_norm": {"mean": [0.5], "std": [0.2]}}
    save_bundle(tmp_path / "m.pt", model, meta)
    m2, meta2 = load_bundle(tmp_path / "m.pt", "cpu")
    x = torch.randn(1, 5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), m2(x))
    assert not m2.training
    for k in ("labels", "windows", "size", "seed", "epoch", "config"):
        assert meta2[k] == meta[k]
    assert meta2["model"]["arch"] == "resnet18" and meta2["model"]["lstm_hidden"] == 16
    assert set(meta2["versions"]) == {"torch", "torchvision", "hemocam", "python"}
    # plain types only: loads with weights_only=True (no pickled code)
    torch.load(tmp_path / "m.pt", weights_only=True)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.pt"):
        load_bundle(tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        save_bundle(tmp_path / "x.pt", model, {"labels": ["any"]})


def test_ensemble_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    nets = [ResNetLSTM("resnet18", in_channels=1, n_labels=1, lstm_hidden=8, lstm_layers=1) for _ in range(2)]
    ens = ResNetLSTMEnsemble(nets).eval()
    x = torch.randn(1, 4, 1, 32, 32)
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(n.eval()(x)) for n in nets]).mean(0)
        assert torch.allclose(torch.sigmoid(ens(x)), want, atol=1e-6)  # the mean probability
    save_bundle(tmp_path / "e.pt", ens, {"labels": ["any"]})
    back, meta = load_bundle(tmp_path / "e.pt")
    assert isinstance(back, ResNetLSTMEnsemble) and len(members(back)) == 2 and meta["kind"] == "resnet_lstm_ensemble"
    assert "state_dicts" not in meta and not back.training
    with torch.no_grad():
        assert torch.equal(back(x), ens(x))
    assert members(nets[0]) == [nets[0]]
    with pytest.raises(ValueError, match="at least 2"):
        ResNetLSTMEnsemble(nets[:1])


def test_pretrained_only_from_local_files(tmp_path, monkeypatch):
    # a torchvision state dict on disk (ImageNet layout, 3 channels, fc included)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = ResNetLSTM("resnet18", in_channels=3, n_labels=2, lstm_hidden=8, lstm_layers=1, pretrained=tmp_path / "r18.pth")
    assert torch.equal(m.encoder.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    m1 = ResNetLSTM("resnet18", in_channels=1, n_labels=2, lstm_hidden=8, lstm_layers=1, pretrained=tmp_path / "r18.pth")
    assert m1.encoder.conv1.weight.shape[1] == 1
    assert torch.allclose(m1.encoder.conv1.weight, ref.conv1.weight.mean(1, keepdim=True) * 3)
    with pytest.raises(FileNotFoundError):
        ResNetLSTM("resnet18", pretrained=tmp_path / "missing.pth")
    # "imagenet" with an empty hub cache: random init, never a download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    ResNetLSTM("resnet18", n_labels=2, lstm_hidden=8, lstm_layers=1, pretrained="imagenet")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    m3 = ResNetLSTM("resnet18", n_labels=2, lstm_hidden=8, lstm_layers=1, pretrained="imagenet")
    assert torch.equal(m3.encoder.conv1.weight, ref.conv1.weight)


def test_encoder_stride_16_doubles_the_feature_map_and_survives_a_bundle(tmp_path):
    torch.manual_seed(0)
    maps = {}
    for stride in (32, 16):
        m = ResNetLSTM("resnet18", in_channels=3, n_labels=1, lstm_hidden=8, lstm_layers=1,
                       encoder_stride=stride).eval()
        h = m.encoder.layer4.register_forward_hook(lambda mod, i, o, s=stride: maps.__setitem__(s, o.shape))
        with torch.no_grad():
            assert m(torch.randn(1, 2, 3, 96, 96)).shape == (1, 2, 1)
        h.remove()
    assert maps[32][-2:] == (3, 3) and maps[16][-2:] == (6, 6)
    save_bundle(tmp_path / "m.pt", m, {"labels": ["any"]})
    m2, _ = load_bundle(tmp_path / "m.pt")
    assert m2.config["encoder_stride"] == 16 and isinstance(m2.encoder.maxpool, torch.nn.Identity)
    with pytest.raises(ValueError):
        ResNetLSTM("resnet18", encoder_stride=8)


def test_frozen_encoder_trains_only_the_sequence_part():
    torch.manual_seed(0)
    m = ResNetLSTM("resnet18", in_channels=3, n_labels=2, lstm_hidden=8, lstm_layers=1)
    m.freeze_encoder(True)
    m.train()
    assert m.training and m.lstm.training and not m.encoder.training  # BatchNorm keeps its statistics
    enc_before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    logits, aux = m(torch.randn(2, 4, 3, 32, 32), lengths=[4, 3], return_aux=True)
    (logits.sum() + aux.sum()).backward()
    opt.step()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert m.lstm.weight_ih_l0.grad is not None and m.head.weight.grad is not None
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in enc_before.items())  # running stats too
    m.freeze_encoder(False)
    m.train()
    assert m.encoder.training and all(p.requires_grad for p in m.encoder.parameters())
