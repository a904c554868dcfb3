"""Bash completion for both spellings of kvconf's command line: ``kvconf ...`` and
``python -m kvconf ...`` (Hydra's own script completes ``kvconf`` and ``python script.py`` only).

    eval "$(python -m kvconf -sc install=bash)"     # or: kvconf -sc install=bash

The script asks kvconf itself for the candidates (``-sc query=bash``); this module turns the
``python -m kvconf`` form of the line into the one Hydra's completion reads, so the candidates are
Hydra's: config groups and their options, keys and their values.
"""

from __future__ import annotations

import os
import re

__all__ = ["INSTALL_SCRIPT", "UNINSTALL_SCRIPT", "normalize_query_line"]

INSTALL_SCRIPT = r"""export _KVCONF_OLD_PYTHON_COMP=$(complete -p python 2> /dev/null)
_kvconf_complete()
{
    local words=($COMP_LINE) helper
    if [ "${words[0]##*/}" == "kvconf" ]; then
        helper="${words[0]}"
    elif [[ "${words[0]##*/}" == python* ]] && [ "${words[1]}" == "-m" ] && [ "${words[2]}" == "kvconf" ]; then
        helper="${words[0]} -m kvconf"
    else
        return 0  # not kvconf: bash's default completion
    fi
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE $helper -sc query=bash 2> /dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "${words[$COMP_CWORD]}"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _kvconf_complete kvconf python python3"""
"""What ``-sc install=bash`` prints: completion for ``kvconf`` and ``python[3] -m kvconf``."""

UNINSTALL_SCRIPT = """unset -f _kvconf_complete
complete -r kvconf python python3 2> /dev/null
${_KVCONF_OLD_PYTHON_COMP}
unset _KVCONF_OLD_PYTHON_COMP"""
"""What ``-sc uninstall=bash`` prints."""

_PYTHON_M = re.compile(r"^\s*\S*python[0-9.]*\s+-m\s+kvconf(\s.*|)$")


def normalize_query_line() -> None:
    """Rewrites ``COMP_LINE`` from ``python -m kvconf ARGS`` to ``kvconf ARGS``, the form Hydra's
    completion strips correctly (it would read ``-m`` as a script and ``kvconf`` as an override).

    >>> os.environ["COMP_LINE"] = "python3 -m kvconf connector=moo"
    >>> normalize_query_line(); os.environ["COMP_LINE"]
    'kvconf connector=moo'
    """
    line = os.environ.get("COMP_LINE", "")
    m = _PYTHON_M.match(line)
    if m:
        os.environ["COMP_LINE"] = "kvconf" + m.group(1)
