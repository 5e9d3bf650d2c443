"""The lowest layer of the config: the base model of every ``ds_ext`` section and the error every bad config raises.

Feature packages import this module (not the aggregate :mod:`ds_ext.config`) for their section's base class and for
:class:`DsExtConfigError`, so a feature never depends on the whole block.
"""
from typing import List

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import ConfigDict


class ExtSection(DeepSpeedConfigModel):
    """DeepSpeed's config model (pydantic, ``extra="forbid"``, docstring per field) with JSON-strict types: a string
    is not silently read as a number."""

    # use_attribute_docstrings: each field's docstring becomes its description, from which docs/config.md is
    # generated (ds_ext.config.reference).
    model_config = ConfigDict(**{**DeepSpeedConfigModel.model_config, "strict": True,
                                 "use_attribute_docstrings": True})


class DsExtConfigError(ValueError):
    """A bad config: ``problems`` lists one ``(json_path, message)`` per problem; ``source`` names the file."""

    def __init__(self, problems: List[tuple], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = [f"invalid ds_ext config ({source}):"]
        lines += [f"  {path}: {msg}" for path, msg in self.problems]
        super().__init__("\n".join(lines))
