"""Inputs a hostile contributor puts in a pull request, for tests/test_hostile_inputs.py and
benchmarks/bench_hostile_inputs.py: config group files (run through the app with ``--config-dir``
and through ``kvconf validate``), command-line overrides (through the app), vLLM JSON (through
``kvconf lint`` and ``kvconf import``) and impossible sizes (as overrides and as files).

Each :class:`Case` says what the user must see: the exit code and a piece of the message (the key,
or the file and line). Nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONNECTOR_HEAD = "name: example\nkv_role: kv_both\n"
"""A connector group file's first two lines: the hostile part comes on line 3."""


def laughs(levels: int, width: int = 10, indent: str = "  ") -> str:
    """Lines of anchors, each a list of ``width`` aliases of the one before: ``width**levels``
    values once expanded."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def merge_laughs(levels: int) -> str:
    """The same through mappings and merge keys (``<<: *a``): keys that are aliases of mappings."""
    lines = ["  m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10}"]
    for i in range(1, levels):
        items = ", ".join(f"k{k}: *m{i - 1}" for k in range(10))
        lines.append(f"  m{i}: &m{i} {{{items}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    """One hostile input and what the user must see."""

    id: str
    kind: str
    """``file`` (a connector group file: the app and validate), ``override`` (the app),
    ``json`` (lint and import), ``model`` (a model's config.json given as kv_cache.model)."""
    content: bytes | str = ""
    """The file's bytes or text (``file``, ``json``, ``model``)."""
    args: tuple[str | bytes, ...] = ()
    """Overrides (``override``), beside ``action=check``."""
    line: int | None = None
    """The line the message names (``file``, ``json``)."""
    key: str | None = None
    """The config key the message names (``override``, and impossible sizes in files)."""
    group: str = "connector"
    """The config group of a ``file`` case."""
    option: str = "evil"
    named: str | None = None
    """More of the message that must be there (``model``: in place of the file and line)."""
    import_code: int = 1
    """``kvconf import``'s exit code (``json``): 2 where the file holds several values (a usage
    error: it asks for ``--index``)."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """More overrides for the app run of a ``file`` case (a kv_cache file needs its connector)."""


def _file(id: str, body: str | bytes, line: int, head: str = CONNECTOR_HEAD, **kw) -> Case:
    content = head.encode() + body if isinstance(body, bytes) else head + body
    return Case(id, "file", content, line=line, **kw)


CORPUS: list[Case] = [
    # aliases, at several depths and places
    _file("laughs-6-in-extra", "extra:\n" + laughs(6), 8),
    _file("laughs-9-in-an-unknown-key", "payload:\n" + laughs(9), 8),
    _file("laughs-3-wide-100-in-vllm-extra", "vllm_extra_config:\n" + laughs(3, width=100), 6),
    _file("laughs-in-a-list-item", "extra:\n  items:\n" + "".join(
        f"  - &l{i} [{', '.join(['lol'] * 10 if i == 0 else [f'*l{i - 1}'] * 10)}]\n" for i in range(6)), 9),
    _file("merge-key-laughs", "extra:\n" + merge_laughs(6), 7),
    _file("alias-cycle", "extra:\n  loop: &loop [1, *loop]\n", 4),
    # nesting, in lists and maps, flow and block
    _file("flow-list-5000-deep", "extra:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", 4),
    _file("flow-map-3000-deep", "extra:\n  x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", 4),
    _file("block-map-200-deep", "extra:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200))
          + "  " * 201 + "v\n", 67),
    _file("block-list-100-deep", "extra:\n  x:\n" + "".join("  " * (i + 2) + "-\n" for i in range(100))
          + "  " * 102 + "- 1\n", 67),
    # size: huge files, huge strings, many values
    _file("file-of-2-MiB", "extra:\n  blob: " + "x" * (2 << 20) + "\n", 1),
    _file("string-of-100-KiB", "extra:\n  blob: " + "x" * (100 << 10) + "\n", 4),
    _file("key-of-100-KiB", "extra:\n  " + "k" * (100 << 10) + ": 1\n", 4),
    _file("list-of-30000-values", "extra:\n  x: [" + ", ".join(["1"] * 30000) + "]\n", 4),
    _file("comments-of-2-MiB", "# " + "c" * (2 << 20) + "\n", 1),
    _file("number-of-5000-digits", "kv_port: " + "9" * 5000 + "\n", 3),
    # bytes: control characters, invalid UTF-8, a repeated key
    _file("control-character-in-a-value", "extra:\n  path: a\x01b\n", 4),
    _file("nul-byte-in-a-value", "extra:\n  path: a\x00b\n", 4),
    _file("invalid-utf8-in-a-value", b"extra:\n  path: caf\xe9\n", 4),
    _file("truncated-utf8-sequence", b"extra:\n  path: \xe2\x82\n", 4),
    _file("key-written-twice", "kv_role: kv_producer\n", 3),
    _file("unknown-key-of-1000-characters", "k" * 1000 + ": 1\n", 3, key="unknown key"),
    _file("kv-role-of-60-KiB", "kv_role: " + "x" * (60 << 10) + "\n", 2, head="name: example\n",
          key="connector.kv_role"),
    _file("escape-sequence-in-a-key", '"k\\e[2J": 1\n', 3, key="unknown key"),
    # command-line overrides
    Case("override-unclosed-list", "override", args=("kv_cache.num_blocks=[",), key="kv_cache.num_blocks"),
    Case("override-unclosed-quote", "override", args=('connector.kv_role="kv_both',), key="connector.kv_role"),
    Case("override-list-3000-deep", "override", args=("kv_cache.num_blocks=" + "[" * 3000 + "]" * 3000,),
         key="kv_cache.num_blocks"),
    Case("override-map-100-deep", "override", args=("connector.extra=" + "{a:" * 100 + "1" + "}" * 100,),
         key="connector.extra"),
    Case("override-of-100-KiB", "override", args=("connector.engine_id=" + "e" * (100 << 10),),
         key="connector.engine_id"),
    Case("override-list-of-5000-values", "override",
         args=("bench.prompt_tokens=[" + ",".join(["64"] * 5000) + "]",), key="bench.prompt_tokens"),
    Case("override-sweep-of-2000-values", "override", args=("-m", "connector.kv_port=" + ",".join(
        str(1000 + i) for i in range(2000))), key="connector.kv_port"),
    Case("override-range-sweep-of-10^8", "override", args=("-m", "kv_cache.num_blocks=range(1,100000000)"),
         key="kv_cache.num_blocks"),
    Case("override-sweeps-of-160000-jobs", "override",
         args=("-m", "connector.kv_port=range(1000,1400)", "kv_cache.num_blocks=range(1,400)"),
         key="connector.kv_port, kv_cache.num_blocks"),
    Case("override-control-character", "override", args=("connector.kv_role=kv_\x1b[2Jboth",), key="connector.kv_role"),
    Case("override-invalid-utf8", "override", args=(b"connector.kv_role=kv_b\xffoth",), key="connector.kv_role"),
    Case("override-newline", "override", args=("connector.engine_id=a\nb",), key="connector.engine_id"),
    Case("override-number-of-5000-digits", "override", args=("kv_cache.num_blocks=" + "7" * 5000,),
         key="kv_cache.num_blocks"),
    # sizes no machine holds
    Case("size-host-tier-1024TiB", "override", args=("connector=offloading", "connector.extra.cpu_bytes_to_use=1024TiB"),
         key="connector.extra.cpu_bytes_to_use"),
    Case("size-kv-cache-memory-1024TiB", "override", args=("kv_cache.num_blocks=null", "kv_cache.memory=1024TiB"),
         key="kv_cache.memory"),
    Case("size-head-of-10^9", "override", args=("kv_cache.groups.0.head_size=1000000000",),
         key="kv_cache.groups.0.head_size"),
    Case("size-a-million-layers", "override", args=("kv_cache.num_layers=1000000",), key="kv_cache.num_layers"),
    Case("size-2^40-blocks", "override", args=("kv_cache.num_blocks=1099511627776",), key="kv_cache.num_blocks"),
    Case("size-blocks-times-pages-over-64TiB", "override",
         args=("kv_cache=llama3_8b", "kv_cache.memory=null", "kv_cache.num_blocks=2000000000"), key="kv_cache.num_blocks"),
    Case("size-disk-tier-100PiB", "override", args=("connector=shared_storage", "connector.extra.capacity=100PiB"),
         key="connector.extra.capacity"),
    Case("size-self-test-transfer-1024TiB", "override", args=("self_test.transfer_bytes=1024TiB",),
         key="self_test.transfer_bytes"),
    Case("size-of-40-digits", "override", args=("kv_cache.num_blocks=null", "kv_cache.memory=" + "9" * 40 + "GiB"),
         key="kv_cache.memory"),
    Case("size-block-of-10^9-tokens", "override", args=("kv_cache.block_size=1000000000",), key="kv_cache.block_size"),
    Case("size-million-kv-heads", "override", args=("kv_cache.groups.0.num_kv_heads=1000000",),
         key="kv_cache.groups.0.num_kv_heads"),
    _file("size-host-tier-in-a-file", "extra:\n  cpu_bytes_to_use: 1024TiB\n", 4,
          head="name: offloading\nkv_role: kv_both\n", key="connector.extra.cpu_bytes_to_use"),
    _file("size-layout-in-a-file", "num_layers: 4\nnum_blocks: 8\nmemory: null\ngroups:\n- type: full_attention\n"
          "  num_kv_heads: 8\n  head_size: 1000000000\n  dtype: bfloat16\n", 7, head="", group="kv_cache",
          key="kv_cache.groups.0.head_size"),
    # vLLM's JSON, through lint and import
    Case("json-nested-5000-deep", "json", '{"kv_connector": "NixlConnector", "kv_role": "kv_both", "x": '
         + "[" * 5000 + "]" * 5000 + "}", line=1),
    Case("json-of-2-MiB", "json", '{"kv_connector": "NixlConnector",\n"x": "' + "a" * (2 << 20) + '"}', line=1),
    Case("json-string-of-100-KiB", "json", '{"kv_connector": "NixlConnector",\n"x": "' + "a" * (100 << 10) + '"}',
         line=2),
    Case("json-200000-values", "json", '{"kv_connector": "NixlConnector",\n\n"x": [' + ",".join(["1"] * 200000) + "]}",
         line=3),
    Case("json-number-of-5000-digits", "json", '{"kv_connector": "NixlConnector",\n"kv_buffer_size": '
         + "9" * 5000 + "}", line=2),
    Case("json-invalid-utf8", "json", b'{"kv_connector": "NixlConnector",\n"kv_role": "kv_b\xf6th"}', line=2),
    Case("json-escaped-in-a-script-3000-deep", "json", 'vllm serve m \\\n  --kv-transfer-config "{\\"kv_connector\\": '
         '\\"NixlConnector\\", \\"x\\": ' + "[" * 3000 + "]" * 3000 + '}"\n', line=2),
    Case("json-script-of-20000-flags", "json", "vllm serve --kv-transfer-config {\n" * 20000, line=65, import_code=2),
    Case("json-control-character", "json", '{"kv_connector": "NixlConnector",\n"kv_role": "kv_\x01both"}', line=2),
    # a model's config.json (kv_cache.model=PATH)
    Case("model-config-nested-5000-deep", "model", '{"model_type": "llama", "x": ' + "[" * 5000 + "]" * 5000 + "}",
         line=1, key="kv_cache.model"),
    Case("model-config-of-a-billion-layers", "model", '{"model_type": "llama",\n"num_hidden_layers": 1000000000,\n'
         '"num_attention_heads": 8, "hidden_size": 1024}', key="kv_cache.model", named="num_hidden_layers is 1,000,000,000"),
    Case("model-config-of-a-billion-wide-head", "model", '{"model_type": "llama", "num_hidden_layers": 2,\n'
         '"num_attention_heads": 8, "head_dim": 1000000000, "hidden_size": 1024}', key="kv_cache.model",
         named="head_dim is 1,000,000,000"),
    Case("model-config-of-2-MiB", "model", '{"model_type": "llama", "x": "' + "a" * (2 << 20) + '"}', line=1,
         key="kv_cache.model"),
]
