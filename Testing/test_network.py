import pytest
import torch
from torch import nn

from engine_helpers import tiny_config
from maml.config import demo_config
from maml.errors import InputError, ModelError
from maml.network import MAMLNet, load_nnunet_weights

unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")


def nnunet_reference(config, in_channels=1):
    n = config.network
    return unet.PlainConvUNet(
        in_channels, n.n_stages, n.features_per_stage, nn.Conv3d, n.kernel_sizes, n.strides,
        n.convs_per_stage(), config.num_classes, n.convs_per_decoder_stage(), conv_bias=n.conv_bias,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True,
    )


@pytest.mark.parametrize("phases", [["venous"], ["arterial", "venous"], ["t1", "t1ce", "t2", "flair"]])
def test_shapes_for_any_number_of_phases(phases):
    config = tiny_config(phases=phases)
    net = MAMLNet(config).train()
    x = torch.randn(2, len(phases), 8, 16, 16)
    out = net(x)
    assert list(out.phase_logits) == phases
    for logits in out.phase_logits.values():
        assert logits[0].shape == (2, 3, 8, 16, 16)
        assert [l.shape[2:] for l in logits[1:]] == [(8, 8, 8)]  # deep supervision, one lower scale
    if len(phases) == 1:  # nothing to fuse: the phase's own head segments
        assert out.fused_logits is None and out.attention is None
        window = net.eval().predict(x)
        assert window.heatmaps is None
        own = torch.softmax(net(x).phase_logits[phases[0]][0], 1)
        assert torch.allclose(window.probabilities, own, atol=1e-6)
        return
    assert out.fused_logits.shape == (2, 3, 8, 16, 16)
    assert set(out.attention) == set(phases)
    assert out.attention[phases[0]].shape == (2, 4, 8, 16, 16)

    probabilities, heatmaps = net.eval().predict(x)[:2]
    assert probabilities.shape == (2, 3, 8, 16, 16)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 8, 16, 16), atol=1e-5)
    assert heatmaps.shape == (2, len(phases), 8, 16, 16)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_eval_forward_skips_deep_supervision_heads():
    net = MAMLNet(tiny_config()).eval()
    out = net(torch.randn(1, 2, 8, 16, 16))
    assert all(len(l) == 1 for l in out.phase_logits.values())


def test_missing_phase_uses_that_phases_own_head():
    net = MAMLNet(tiny_config()).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    probabilities, heatmaps = net.predict(x, ["venous"])[:2]
    _, own_logits = net.backbones["venous"](x)
    assert heatmaps is None
    assert torch.allclose(probabilities, torch.softmax(own_logits[0], 1), atol=1e-6)


def test_subset_of_phases_averages_present_heads_and_skips_absent_ones():
    phases = ["t1", "t1ce", "t2", "flair"]
    net = MAMLNet(tiny_config(phases=phases)).eval()
    called = []
    for name, backbone in net.backbones.items():
        backbone.register_forward_hook(lambda *_, name=name: called.append(name))
    x = torch.randn(1, 2, 8, 16, 16)
    probabilities, heatmaps = net.predict(x, ["flair", "t1ce"])[:2]  # any order, model order used
    assert called == ["t1ce", "flair"]
    expected = (torch.softmax(net.backbones["t1ce"](x[:, :1])[1][0], 1)
                + torch.softmax(net.backbones["flair"](x[:, 1:])[1][0], 1)) / 2
    assert heatmaps is None
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_fused_path_differs_from_each_single_head():
    net = MAMLNet(tiny_config()).eval()
    x = torch.randn(1, 2, 8, 16, 16)
    fused = net.predict(x).probabilities
    venous_only = net.predict(x[:, 1:], ["venous"]).probabilities
    assert not torch.allclose(fused, venous_only)


def test_bad_phase_names_and_channel_counts_are_input_errors():
    net = MAMLNet(tiny_config())
    with pytest.raises(InputError, match="portal"):
        net(torch.randn(1, 1, 8, 16, 16), ["portal"])
    with pytest.raises(InputError, match="2 phases"):
        net(torch.randn(1, 3, 8, 16, 16))
    with pytest.raises(InputError):
        net(torch.randn(1, 2, 8, 16, 16), ["venous", "venous"])


def test_ma_module_variants():
    paper = MAMLNet(tiny_config(ma_variant="paper"))
    linear = MAMLNet(tiny_config(ma_variant="paper-linear"))
    code = MAMLNet(tiny_config(ma_variant="code"))
    kinds = [type(m).__name__ for m in paper.fusion.attention["venous"]]
    # the paper: each convolution followed by instance norm and leaky ReLU, then the sigmoid
    assert kinds == ["Conv3d", "InstanceNorm3d", "LeakyReLU", "Conv3d", "InstanceNorm3d",
                     "LeakyReLU", "Sigmoid"]
    assert paper.fusion.attention["venous"][3].kernel_size == (1, 1, 1)
    assert [type(m).__name__ for m in linear.fusion.attention["venous"]][3:] == ["Conv3d", "Sigmoid"]
    assert code.fusion.attention["venous"][3].kernel_size == (3, 3, 3)
    assert paper.fused_head.bias is not None and code.fused_head.bias is None
    assert linear.fused_head.bias is not None


def test_checkpoints_from_before_the_normalised_attention_load_unchanged(tmp_path):
    """A "paper" checkpoint without the second norm's weights is the paper-linear form."""
    from maml.model import load_model, save_checkpoint

    config = tiny_config(ma_variant="paper-linear")
    net = MAMLNet(config)
    old = tiny_config(ma_variant="paper-linear")
    old.network.ma_variant = "paper"  # what such a checkpoint's configuration says
    save_checkpoint(tmp_path / "old.pt", net, old, {})
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config.network.ma_variant == "paper-linear"
    x = torch.randn(1, 2, *config.patch_size)
    net.eval()
    with torch.no_grad():
        assert torch.equal(loaded.network(x).fused_logits, net(x).fused_logits)
    fresh = MAMLNet(tiny_config(ma_variant="paper"))
    save_checkpoint(tmp_path / "new.pt", fresh, tiny_config(ma_variant="paper"), {})
    assert load_model(tmp_path / "new.pt").config.network.ma_variant == "paper"


@pytest.mark.parametrize("make_config", [tiny_config, demo_config], ids=["tiny", "demo-anisotropic"])
def test_backbone_matches_nnunet_plain_conv_unet(make_config):
    config = make_config()
    reference = nnunet_reference(config)
    net = MAMLNet(config)
    backbone = net.backbones["venous"]
    assert {k: v.shape for k, v in reference.named_parameters()} == \
        {k: v.shape for k, v in backbone.named_parameters()}

    load_nnunet_weights(net, "venous", reference.state_dict())
    x = torch.randn(1, 1, *config.patch_size)
    reference.train(), backbone.train()
    expected = reference(x)
    _, logits = backbone(x, deep_supervision=True)
    assert len(expected) == len(logits)
    for e, got in zip(expected, logits):
        assert torch.allclose(e, got, atol=1e-5)


def test_warm_start_from_nnunet_checkpoint_file_with_stacked_channels(tmp_path):
    config = tiny_config()
    reference = nnunet_reference(config, in_channels=2)
    weights = {"_orig_mod." + k: v for k, v in reference.state_dict().items()}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer"}, path)

    net = MAMLNet(config)
    load_nnunet_weights(net, "arterial", path, input_channel=0)
    load_nnunet_weights(net, "venous", path, input_channel=1)
    x = torch.randn(1, 2, 8, 16, 16)
    reference.eval(), net.eval()
    # Stacked channels feed the first conv linearly: the two single-channel backbones see the
    # halves of that conv. Compare the first conv's response directly.
    first = reference.encoder.stages[0][0].convs[0].conv
    with torch.no_grad():
        stacked = first(x)
        split = (net.backbones["arterial"].encoder.stages[0][0].convs[0].conv(x[:, :1])
                 + net.backbones["venous"].encoder.stages[0][0].convs[0].conv(x[:, 1:])
                 - first.bias[None, :, None, None, None])
    assert torch.allclose(stacked, split, atol=1e-5)


def test_warm_start_rejects_a_network_of_another_shape():
    reference = nnunet_reference(tiny_config(base_features=8))
    net = MAMLNet(tiny_config(base_features=4))
    with pytest.raises(ModelError, match="shape mismatches"):
        load_nnunet_weights(net, "venous", reference.state_dict())
