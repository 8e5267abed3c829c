import numpy as np
import pytest
import torch
from torch import nn

from hemocam import cam
from hemocam.preprocess import cache_paths, load_cache, to_original_grid


class ToySequence(nn.Module):
    """Known answer: logit_t = mean(A_t[0]) - 2 mean(A_{t-1}[0]) - mean(A_t[1]).

    Channel 0 supports slice t's own logit (so its own CAM must light up where channel 0 is on)
    but *opposes* the next slice's logit; channel 1 opposes. A CAM that summed the logits of all
    slices (instead of taking each slice's own logit) would give slice t a negative weight on
    channel 0 and an empty map.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.layer4 = nn.Sequential(conv, nn.ReLU())

    def forward(self, x):
        b, t = x.shape[:2]
        a = self.layer4(x.flatten(0, 1))
        f = a.mean((2, 3)).view(b, t, 2)
        prev = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)
        logit = f[..., 0] - 2 * prev[..., 0] - f[..., 1]
        return logit[..., None]


def toy_scan():
    x = torch.zeros(1, 5, 2, 16, 16)
    x[0, 3, 0, 2:5, 2:5] = 1.0  # slice 3: supporting blob, top left
    x[0, 3, 1, 10:13, 10:13] = 1.0  # slice 3: opposing channel, bottom right
    x[0, 2, 0, 10:13, 2:5] = 0.5  # slice 2: weaker supporting blob, bottom left
    return x


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_cam_known_answer_through_a_sequence_head(method, grad_mode):
    maps, probs = cam.slice_cams(ToySequence(), toy_scan(), "layer4", [0], method=method, grad_mode=grad_mode, chunk=2)
    m = maps[0]
    assert m.shape == (5, 16, 16) and m.dtype == np.float32
    assert probs.shape == (5, 1)
    assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    # slice 3: the map is its supporting blob, nothing at the opposing channel's blob
    s3 = m[3]
    assert np.unravel_index(s3.argmax(), s3.shape)[0] in range(2, 5)
    assert s3[2:5, 2:5].min() == pytest.approx(1.0)
    assert s3[10:13, 10:13].max() == 0.0
    assert s3[10:13, 2:5].max() == 0.0  # slice 2's blob does not leak into slice 3
    # slice 2: its own logit rises with its blob (a summed-logit CAM would see -1 here)
    assert m[2][10:13, 2:5].min() > 0.1
    assert m[2][2:5, 2:5].max() == 0.0
    # per-scan normalisation: the weaker slice stays below the strongest
    assert m[2].max() < 1.0
    # slices without evidence stay empty
    assert m[0].max() == 0.0 and m[4].max() == 0.0


def test_gradcampp_weights_follow_the_paper_by_hand():
    # alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3 sum_ab A_ab): here 1 / (2 + 4) at the one gradient cell
    A = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    G = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    m = cam._weights_and_maps(A, G, "gradcampp")
    np.testing.assert_allclose(m[0].numpy(), [[1 / 6, 0.5], [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(cam._weights_and_maps(A, G, "gradcam")[0].numpy(), [[0.25, 0.75], [0.0, 0.0]])


def test_cam_upsamples_and_layer_lookup():
    maps, _ = cam.slice_cams(ToySequence(), toy_scan(), "layer4", [0], out_size=32)
    assert maps[0].shape == (5, 32, 32)
    with pytest.raises(ValueError, match="layer"):
        cam.slice_cams(ToySequence(), toy_scan(), "layer9", [0])
    with pytest.raises(ValueError, match="method"):
        cam.slice_cams(ToySequence(), toy_scan(), "layer4", [0], method="cam++")


class TinyResNetLSTM(nn.Module):
    """A stand-in with the real layout: per-slice CNN (…layer3, layer4), GAP, bidirectional LSTM."""

    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.lstm = nn.LSTM(16, 8, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        b, t = x.shape[:2]
        f = self.layer4(self.layer3(x.flatten(0, 1))).mean((2, 3)).view(b, t, -1)
        return self.fc(self.lstm(f)[0])


def test_batched_and_looped_gradients_agree_and_match_autograd():
    torch.manual_seed(0)
    model = TinyResNetLSTM().eval()
    x = torch.randn(1, 7, 3, 32, 32)
    a, b = (cam.slice_cams(model, x, "layer4", [0, 2], grad_mode=g, chunk=3)[0] for g in ("loop", "batched"))
    for li in (0, 2):
        np.testing.assert_allclose(a[li], b[li], atol=1e-5)
    # reference: plain full-graph autograd, one slice at a time
    acts = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    logits = model(x)[0]
    h.remove()
    A = acts["a"]
    ref = []
    for t in range(7):
        g = torch.autograd.grad(logits[t, 2], A, retain_graph=True)[0][t]
        ref.append(torch.relu((g.mean((1, 2), keepdim=True) * A[t]).sum(0)))
    ref = torch.stack(ref).detach()
    ref = (ref / ref.max()).numpy() if ref.max() > 0 else ref.numpy()
    np.testing.assert_allclose(a[2], ref, atol=1e-5)
    assert model.training is False


def test_cam_rejects_bad_input():
    with pytest.raises(ValueError, match="one scan"):
        cam.slice_cams(ToySequence(), torch.zeros(2, 3, 2, 8, 8))


def test_cam_batch_through_the_real_resnet_lstm(tmp_path):
    from hemocam.classifier import input_norm
    from hemocam.io import load_nifti, read_tsv
    from hemocam.labelset import LABELS, SUBTYPES
    from hemocam.models.resnet_lstm import ResNetLSTM, save_bundle
    from hemocam.phantom import write_nifti_cohort
    from hemocam.preprocess import preprocess_batch

    R = tmp_path / "R"
    windows = [{"name": "brain", "center": 40, "width": 80}, {"name": "subdural", "center": 80, "width": 200}]
    scans = write_nifti_cohort(R, 2, matrix=64, n_slices=16, seed=5)
    ids = list(scans["scan_id"])[:1]
    preprocess_batch(ids, R, windows, 32, R / "pre.tsv")
    torch.manual_seed(0)
    model = ResNetLSTM("resnet18", in_channels=2, n_labels=6, lstm_hidden=8, lstm_layers=2)
    bundle = tmp_path / "clf.pt"
    save_bundle(bundle, model, {"labels": list(LABELS), "windows": windows, "size": 32, "input_norm": input_norm(2)})
    df = cam.cam_batch(bundle, ids + ["nope"], R, {"method": "gradcampp", "layer": "layer4", "label": "any",
                                                   "per_subtype": True}, tmp_path / "cam.tsv")
    st = df.set_index("scan_id")["status"]
    assert (st[ids] == "ok").all() and st["nope"] == "rejected"
    assert len(read_tsv(tmp_path / "cam.tsv")) == 2
    for sid in ids:
        ct, aff = load_nifti(R / "nifti" / f"{sid}.nii.gz")
        m, aff2 = load_nifti(R / "cam" / f"{sid}.nii.gz")
        assert m.dtype == np.float32 and m.shape == ct.shape and np.allclose(aff, aff2)
        assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() > 0.5  # scan-normalised
        for s in SUBTYPES:
            assert (R / "cam" / f"{sid}_{s}.nii.gz").exists()
    with pytest.raises(ValueError, match="layer"):
        cam.cam_batch(bundle, ids, R, {"layer": "layer7"}, tmp_path / "cam2.tsv")

    # an ensemble bundle: the stage writes the members' averaged map, the classifier their mean
    from hemocam.classifier import predict_batch, scan_input
    from hemocam.models.resnet_lstm import ResNetLSTMEnsemble, load_bundle

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(ResNetLSTM("resnet18", in_channels=2, n_labels=6, lstm_hidden=8, lstm_layers=2).eval())
    meta = {"labels": list(LABELS), "windows": windows, "size": 32, "input_norm": input_norm(2)}
    save_bundle(tmp_path / "ens.pt", ResNetLSTMEnsemble(nets), meta)
    ens, meta_b = load_bundle(tmp_path / "ens.pt")
    cache, cmeta = load_cache(*cache_paths(R, ids[0]))
    alone = [cam.slice_cams(m, scan_input(cache, meta_b), "layer4", [0], "gradcampp", out_size=32)[0][0] for m in nets]
    want, _ = cam.ensemble_cams(ens, scan_input(cache, meta_b), "layer4", [0], "gradcampp", out_size=32,
                                grad_mode="auto", chunk=32, use="mean")
    assert min(a.max() for a in alone) > 0 and not np.allclose(want[0], alone[0], atol=1e-3)  # both members count
    for use, maps in (("mean", want[0]), ("first", alone[0])):
        # on the CPU, where `want` was computed: on a GPU the stage runs in bf16
        cam.cam_batch(tmp_path / "ens.pt", ids, R, {"label": "any", "method": "gradcampp", "members": use},
                      tmp_path / f"cam-{use}.tsv", device="cpu")
        got, _ = load_nifti(R / "cam" / f"{ids[0]}.nii.gz")
        assert np.allclose(got, np.clip(to_original_grid(maps, cmeta, order=1), 0, 1), atol=1e-5), use
    predict_batch(tmp_path / "ens.pt", ids, R, tmp_path / "cls.tsv", device="cpu")
    sl = read_tsv(R / "classifier" / "slices" / f"{ids[0]}.tsv")
    assert len(sl) == 16 and 0 <= sl["any"].min() and sl["any"].max() <= 1


def test_sequence_path_matches_per_slice_backward_on_resnet_lstm():
    from hemocam.models.resnet_lstm import ResNetLSTM

    torch.manual_seed(1)
    model = ResNetLSTM("resnet18", in_channels=2, n_labels=6, lstm_hidden=8, lstm_layers=2).eval()
    x = torch.rand(1, 5, 2, 32, 32)
    assert cam._uses_sequence_path(model, cam.find_layer(model, "layer4"))
    seq, p_seq = cam.slice_cams(model, x, "layer4", [0, 4], grad_mode="sequence")
    ref, p_ref = cam.slice_cams(model, x, "layer4", [0, 4], grad_mode="loop")
    np.testing.assert_allclose(p_seq, p_ref, atol=1e-5)
    for li in (0, 4):
        np.testing.assert_allclose(seq[li], ref[li], atol=1e-4)
    # fewer copies of the sequence per head pass than slices (long scans): the same maps
    seq2, p_seq2 = cam.slice_cams(model, x, "layer4", [0, 4], grad_mode="sequence", chunk=2)
    np.testing.assert_allclose(p_seq2, p_seq, atol=1e-6)
    for li in (0, 4):
        np.testing.assert_allclose(seq2[li], seq[li], atol=1e-5)
    pp, _ = cam.slice_cams(model, x, "layer4", [0], "gradcampp")
    pp_ref, _ = cam.slice_cams(model, x, "layer4", [0], "gradcampp", grad_mode="batched")
    np.testing.assert_allclose(pp[0], pp_ref[0], atol=1e-4)
    auto, _ = cam.slice_cams(model, x, "encoder.layer3", [0])  # a layer with more network after it
    ref3, _ = cam.slice_cams(model, x, "encoder.layer3", [0], grad_mode="loop")
    np.testing.assert_allclose(auto[0], ref3[0], atol=1e-4)
    assert not model.training and model.lstm.dropout == pytest.approx(0.3) and not model.lstm.training
    with pytest.raises(ValueError, match="sequence"):
        cam.slice_cams(ToySequence(), toy_scan(), "layer4", [0], grad_mode="sequence")
