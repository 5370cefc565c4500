"""The parser of every wherefrom command but ``fit`` (which is LightningCLI's)."""

from __future__ import annotations

from typing import Any, NoReturn

import jsonargparse

from wherefrom.errors import WherefromError


class ConfigArgumentParser(jsonargparse.ArgumentParser):
    """jsonargparse for wherefrom's commands, as for ``fit``: ``--config file.yaml`` (its keys are the
    options, e.g. ``top_k: 8``; later flags override it) and ``--print_config``; a usage error raises a
    one-line :class:`WherefromError` instead of printing the usage.

    ``config_file=False``: the command's ``--config`` is a file of its own (the LDS benchmark's), so
    it declares that option itself."""

    def __init__(self, *args: Any, config_file: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, exit_on_error=False, **kwargs)
        if config_file:
            self.add_argument("--config", action=jsonargparse.ActionConfigFile, help="a YAML/JSON file of these options (flags after it override it)")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        message = " ".join(message.split())
        head, sep, keys = message.partition("the following arguments are required: ")
        if sep:  # jsonargparse names the keys (a subcommand's prefixed, "train.config"); name the flags, as argparse does
            subcommands = getattr(getattr(self, "_subcommands_action", None), "_name_parser_map", {})
            names = [k.strip() for k in keys.split(",")]
            names = [k.partition(".")[2] if k.partition(".")[0] in subcommands else k for k in names]
            message = head + sep + ", ".join("--" + k.replace("_", "-") for k in names)
        raise WherefromError(f"{message}; see `{self.prog} --help`")
