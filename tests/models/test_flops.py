"""FLOPs from the graph: a hand-counted toy model, reuse, nesting, and patch scaling of the real models."""
import keras
import pytest

from cellavie_hpc.models.flops import flops_per_sample, training_flops_per_sample
from cellavie_hpc.models.registry import build_model


def test_hand_counted_toy_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 2 * 8*8*4 * 3*3*3 = 13824
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", groups=2)(x)  # 2 * 4*4*4 * 3*3*2 = 2304
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)  # 2 * 4*4*4 * 2*2*2 = 1024
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 2 * 8*8*2 * 3*3 = 2304
    x = keras.layers.BatchNormalization()(x)  # not counted
    shared = keras.layers.Dense(5)  # called twice: 2 * 128*5 + 2 * 5*5 = 1330
    x = shared(keras.layers.Flatten()(x))
    x = keras.layers.Dense(5)(keras.layers.ReLU()(x))
    outputs = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])(x)  # nested: 2 * 5*3 = 30
    model = keras.Model(inputs, outputs)
    expected = 13824 + 2304 + 1024 + 2304 + 2 * 128 * 5 + 2 * 5 * 5 + 30
    assert flops_per_sample(model) == expected
    assert training_flops_per_sample(model) == 3 * expected


def test_reused_layer_counts_every_call():
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(2, 1)
    model = keras.Model(inputs, conv(conv(inputs)))
    assert flops_per_sample(model) == 2 * (2 * 6 * 6 * 2 * 2)


def test_dynamic_shapes_are_refused():
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="static shapes"):
        flops_per_sample(model)


@pytest.mark.parametrize("name", ["refocus", "unet", "detector"])
def test_fully_convolutional_models_scale_with_pixel_count(name):
    small = flops_per_sample(build_model(name, "tiny", patch=32))
    large = flops_per_sample(build_model(name, "tiny", patch=64))
    assert small > 1e6
    assert large / small == pytest.approx(4.0, rel=0.01)
