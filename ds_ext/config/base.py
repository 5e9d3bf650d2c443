"""Base model of every ``ds_ext`` config section (feature packages import it without importing the whole block)."""
from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import ConfigDict


class ExtSection(DeepSpeedConfigModel):
    """DeepSpeed's config model (pydantic, ``extra="forbid"``, docstring per field) with JSON-strict types: a string
    is not silently read as a number."""

    model_config = ConfigDict(**{**DeepSpeedConfigModel.model_config, "strict": True})
