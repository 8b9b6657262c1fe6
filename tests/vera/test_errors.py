"""A further VeRA adapter on a model must fit the shared projections (PEFT's rules): same
``projection_prng_key``, same ``save_projection``, ``r`` no larger than the first adapter's. Each mismatch raises
a ``ValueError`` (as PEFT's) naming the fix, and leaves the model as it was."""

from __future__ import annotations

import peft
import pytest
from support.models import TwoLinear

from deltatune import VeraConfig, get_peft_model
from deltatune.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:.*(fan_in_fan_out|save_projection)")


BAD = [
    ({"projection_prng_key": 1}, r"projection_prng_key=1 .* use projection_prng_key=0"),
    ({"save_projection": False}, r"save_projection=False .* saved for all adapters or none"),
    ({"r": 8}, r"r=8, larger than the shared projections' rank 4 .* use r<=4"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_incompatible_second_adapter_refused_like_peft(kwargs: dict, message: str) -> None:
    theirs = peft.get_peft_model(TwoLinear(), peft.VeraConfig(r=4, target_modules=["a", "b"]))
    with pytest.raises(ValueError):
        theirs.add_adapter("two", peft.VeraConfig(target_modules=["a", "b"], **{"r": 4, **kwargs}))

    ours = get_peft_model(TwoLinear(), VeraConfig(r=4, target_modules=["a", "b"]))
    keys = set(ours.state_dict())
    with pytest.raises(ConfigError, match=message):
        ours.add_adapter("two", VeraConfig(target_modules=["a", "b"], **{"r": 4, **kwargs}))
    assert list(ours.peft_config) == ["default"] and set(ours.state_dict()) == keys  # nothing half-added


def test_compatible_second_adapter_accepted() -> None:
    ours = get_peft_model(TwoLinear(), VeraConfig(r=4, target_modules=["a", "b"]))
    ours.add_adapter("two", VeraConfig(r=4, target_modules=["a"]))
    assert ours.base_model.vera_A["two"].shape[0] == 4
