import pytest
import torch

from hemocam.models.unet import UNet, in_channels_for


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
