"""Small keras-hub CNN backbones built from config (random weights, no preset download).

Shared by the keras-hub tests, ``examples/keras_hub_table.py`` and
``benchmarks/fold.py``. The configs follow keras-hub's own ``*_backbone_test.py``
files, made smaller where that keeps every block type. BN statistics are set to
trained-like values by `trained_like`, seeded.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from kerasbn.folding import plan


def _hub():
    import keras_hub

    return keras_hub.models


def hgnetv2() -> keras.Model:
    return _hub().HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=32,
        hidden_sizes=[64, 128],
        stem_channels=[3, 16, 32],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[32, 16, 64, 1, 1, 3], [64, 32, 128, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=(64, 64, 3),
    )


def mobilenet_v3() -> keras.Model:
    return _hub().MobileNetBackbone(
        stackwise_expansion=[[16], [72, 88], [96, 240]],
        stackwise_num_blocks=[1, 2, 2],
        stackwise_num_filters=[[16], [24, 24], [40, 40]],
        stackwise_kernel_size=[[3], [3, 3], [5, 5]],
        stackwise_num_strides=[[2], [2, 1], [2, 1]],
        stackwise_se_ratio=[[0.25], [None, None], [0.25, 0.25]],
        stackwise_activation=[["relu"], ["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1], [1, 1], [2, 2]],
        output_num_filters=96,
        depthwise_filters=16,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=96,
        squeeze_and_excite=0.5,
        image_shape=(64, 64, 3),
    )


def efficientnet_fused() -> keras.Model:
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3],
        stackwise_num_repeats=[1, 2, 1, 2],
        stackwise_input_filters=[16, 16, 24, 32],
        stackwise_output_filters=[16, 24, 32, 48],
        stackwise_expansion_ratios=[1, 4, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 1],
        stackwise_block_types=["fused", "fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0] * 4,
        stackwise_nores_option=[False] * 4,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        input_shape=(64, 64, 3),
    )


def efficientnet_test_config() -> keras.Model:
    """keras-hub's own EfficientNet test config (39 blocks, fused and unfused): a benchmark size."""
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3, 3, 3],
        stackwise_num_repeats=[2, 4, 4, 6, 9, 15],
        stackwise_input_filters=[24, 24, 48, 64, 128, 160],
        stackwise_output_filters=[24, 48, 64, 128, 160, 256],
        stackwise_expansion_ratios=[1, 4, 4, 4, 6, 6],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0, 0.25, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 2, 1, 2],
        stackwise_block_types=["fused"] * 3 + ["unfused"] * 3,
        stackwise_force_input_filters=[0] * 6,
        stackwise_nores_option=[False] * 6,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        input_shape=(224, 224, 3),
    )


def resnet_vd() -> keras.Model:
    return _hub().ResNetBackbone(
        input_conv_filters=[16, 16, 32],
        input_conv_kernel_sizes=[3, 3, 3],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        image_shape=(64, 64, 3),
        block_type="bottleneck_block_vd",
        use_pre_activation=False,
    )


def cspnet() -> keras.Model:
    return _hub().CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 2],
        stackwise_num_filters=[16, 24],
        image_shape=(64, 64, 3),
        down_growth=True,
        bottle_ratio=(0.5,) + (1.0,),
        block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
    )


def densenet() -> keras.Model:
    return _hub().DenseNetBackbone(
        stackwise_num_repeats=[2, 2, 2, 2], compression_ratio=0.5, growth_rate=4, image_shape=(32, 32, 3)
    )


def _resnet_encoder(levels: int) -> keras.Model:
    return _hub().ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64] * levels,
        stackwise_num_blocks=[1] * levels,
        stackwise_num_strides=[1] + [2] * (levels - 1),
        image_shape=(None, None, 3),
        block_type="bottleneck_block",
        use_pre_activation=False,
    )


def deeplab_v3() -> keras.Model:
    return _hub().DeepLabV3Backbone(
        image_encoder=_resnet_encoder(3),
        projection_filters=16,
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P4",
        upsampling_size=4,
        dilation_rates=[6, 12],
        image_shape=(64, 64, 3),
    )


def retinanet() -> keras.Model:
    """ResNet encoder and a feature pyramid with BN (three outputs)."""
    return _hub().RetinaNetBackbone(
        image_encoder=_resnet_encoder(4),
        min_level=3,
        max_level=5,
        use_p5=False,
        use_fpn_batch_norm=True,
        image_shape=(64, 64, 3),
    )


def d_fine() -> keras.Model:
    """keras-hub's own D-FINE test config (``d_fine_backbone_test.py``): 49 BN, a top-k query selection.

    Its input size is free (``(None, None, 3)``) and its top-k needs at least
    ``num_queries`` = 10 positions: check it with `d_fine_batch`, not random 8×8 images.
    """
    encoder = _hub().HGNetV2Backbone(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[[8, 8, 16, 1, 1, 3], [16, 8, 32, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, False],
        depths=[1, 1],
        hidden_sizes=[16, 32],
        embedding_size=8,
        use_learnable_affine_block=True,
        hidden_act="relu",
        image_shape=(None, None, 3),
        out_features=["stage1", "stage2"],
    )
    return _hub().DFineBackbone(
        backbone=encoder,
        decoder_in_channels=[16, 16],
        encoder_hidden_dim=16,
        num_denoising=10,
        num_labels=4,
        hidden_dim=16,
        learn_initial_query=False,
        num_queries=10,
        anchor_image_size=(32, 32),
        feat_strides=[4, 8],
        num_feature_levels=2,
        encoder_in_channels=[16, 32],
        encode_proj_layers=[1],
        num_attention_heads=2,
        encoder_ffn_dim=32,
        num_encoder_layers=1,
        hidden_expansion=0.5,
        depth_multiplier=0.5,
        eval_idx=-1,
        num_decoder_layers=3,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=[2, 2],
        lqe_hidden_dim=16,
        num_lqe_layers=2,
        out_features=["stage1", "stage2"],
        image_shape=(None, None, 3),
        seed=0,
    )


def d_fine_batch(batch: int = 2, seed: int = 0) -> np.ndarray:
    """Seeded 32×32 images in [0, 1), the size of D-FINE's test config."""
    return np.random.default_rng(seed).uniform(0, 1, (batch, 32, 32, 3)).astype("float32")


BACKBONES: dict[str, Callable[[], keras.Model]] = {
    "HGNetV2": hgnetv2,
    "MobileNet (v3)": mobilenet_v3,
    "EfficientNet (fused-MBConv)": efficientnet_fused,
    "ResNet (vd)": resnet_vd,
    "CSPNet": cspnet,
    "DenseNet": densenet,
    "DeepLabV3 (ResNet encoder)": deeplab_v3,
    "RetinaNet (ResNet encoder, FPN with BN)": retinanet,
}


def trained_like(model: keras.Model, seed: int = 0) -> keras.Model:
    """Give every BN trained-like statistics, in place: γ∈[0.8, 1.2], β, μ ∈ ±0.1, σ² ∈ [0.8, 1.25]."""
    rng = np.random.default_rng(seed)
    draw = {
        "gamma": (0.8, 1.2),
        "beta": (-0.1, 0.1),
        "moving_mean": (-0.1, 0.1),
        "moving_variance": (0.8, 1.25),
    }
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if plan.is_bn(layer):
            for w in layer.weights:
                if w.name in draw:
                    w.assign(rng.uniform(*draw[w.name], tuple(w.shape)).astype(w.dtype))
    return model


def image_batch(model: keras.Model, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal batch for an image backbone with a static input shape."""
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype("float32")
