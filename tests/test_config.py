import dataclasses

import pytest

from kivi_ops.config import KIVIConfig


def test_defaults_are_the_papers_kivi2():
    c = KIVIConfig()
    assert (c.k_bits, c.v_bits, c.group_size, c.residual_length, c.backend) == (2, 2, 32, 128, "auto")
    assert c.name == "KIVI-2" and KIVIConfig(k_bits=4, v_bits=2).name == "KIVI-K4V2"


@pytest.mark.parametrize("kwargs, field", [
    (dict(k_bits=3), "k_bits"), (dict(v_bits=1), "v_bits"), (dict(k_bits=True), "k_bits"),
    (dict(v_bits=2.0), "v_bits"), (dict(group_size=0), "group_size"), (dict(group_size=12), "group_size"),
    (dict(group_size=-32), "group_size"), (dict(residual_length=0), "residual_length"),
    (dict(residual_length=48), "residual_length"), (dict(group_size=64, residual_length=32), "residual_length"),
    (dict(backend="tpu"), "backend"),
])
def test_bad_configs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KIVIConfig(**kwargs)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "cuda", "triton"])
def test_every_backend_name_is_accepted(backend):
    assert KIVIConfig(backend=backend).backend == backend


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KIVIConfig().k_bits = 4
