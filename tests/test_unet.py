import pytest
import torch

from hemocam.models.unet import UNet, UNetEnsemble, in_channels_for


@pytest.mark.parametrize("encoder,context", [("plain", 0), ("plain", 1), ("plain", 2), ("resnet18", 1)])
def test_unet_shapes_with_context_channels(encoder, context):
    cin = in_channels_for(3, context)
    assert cin == 3 * (2 * context + 1)
    net = UNet(cin, encoder=encoder, base=8).eval()
    x = torch.randn(2, cin, 48, 40)  # not a power of two on purpose
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 1, 48, 40)
    assert torch.isfinite(y).all()
    with pytest.raises(RuntimeError):  # wrong channel count is refused by the first conv
        net(torch.randn(1, cin + 1, 48, 40))


def test_unet_trains_on_a_trivial_target():
    torch.manual_seed(0)
    net = UNet(3, encoder="plain", base=4)
    x = torch.randn(4, 3, 16, 16)
    target = (x[:, :1] > 0.5).float()  # a pixelwise rule of the first channel
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_unet_rejects_unknown_encoder():
    with pytest.raises(ValueError, match="encoder"):
        UNet(3, encoder="vgg99")


def test_an_ensemble_predicts_its_members_mean_probability():
    torch.manual_seed(0)
    nets = [UNet(6, encoder="plain", base=4).eval() for _ in range(3)]
    with torch.no_grad():  # members that disagree: confident either way, and unsure
        for net, bias in zip(nets, (-4.0, 0.0, 3.0)):
            net.head.bias.fill_(bias)
    ens = UNetEnsemble(nets).eval()
    assert ens.in_channels == 6
    x = torch.randn(2, 6, 20, 24)
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(n(x)) for n in nets])
        got = torch.sigmoid(ens(x))
    assert got.shape == (2, 1, 20, 24)
    assert torch.allclose(got, probs.mean(0), atol=1e-6)
    # the mean of probabilities, not of logits: they differ where members disagree
    with torch.no_grad():
        logit_mean = torch.sigmoid(torch.stack([n(x) for n in nets]).mean(0))
    assert not torch.allclose(got, logit_mean, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        UNetEnsemble(nets[:1])
    with pytest.raises(ValueError, match="input channels"):
        UNetEnsemble([nets[0], UNet(3, encoder="plain", base=4)])
