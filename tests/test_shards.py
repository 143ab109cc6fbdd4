"""``tests/run.py``'s shards (``conftest._shards``): every test in exactly one shard, about equal
recorded time, and a file whose tests share a module-scoped fixture kept whole."""

from __future__ import annotations

import json
import types

import conftest


def _item(nodeid: str, scopes: tuple[str, ...] = ()) -> types.SimpleNamespace:
    defs = {f"fixture{i}": [types.SimpleNamespace(scope=s, baseid="tests/x.py")] for i, s in enumerate(scopes)}
    return types.SimpleNamespace(nodeid=nodeid, _fixtureinfo=types.SimpleNamespace(name2fixturedefs=defs))


def test_shards_cover_every_test_once_balanced_and_keep_shared_fixtures_whole(tmp_path, monkeypatch) -> None:
    timings = {"tests/a.py::t[0]": 10.0, "tests/a.py::t[1]": 10.0, "tests/a.py::t[2]": 1.0,
               "tests/b.py::t[0]": 6.0, "tests/b.py::t[1]": 6.0}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    monkeypatch.setattr(conftest, "TIMINGS", str(tmp_path / "timings.json"))
    items = [_item(n) for n in timings if n.startswith("tests/a.py")]
    items += [_item(n, ("module",)) for n in timings if n.startswith("tests/b.py")]
    items += [_item("tests/c.py::new")]  # not recorded: the median (6 s)
    shards = conftest._shards(items, 2)
    ids = [n for shard in shards for n in shard]
    assert sorted(ids) == sorted(i.nodeid for i in items)  # each test once
    # b.py's two tests share a module fixture: one unit of 12 s, in one shard
    assert any({"tests/b.py::t[0]", "tests/b.py::t[1]"} <= set(shard) for shard in shards)
    # 39 s in all; longest unit first to the lightest shard: 12+6+1 against 10+10
    load = sorted(sum(timings.get(n, 6.0) for n in shard) for shard in shards)
    assert load == [19.0, 20.0], shards
    assert sorted(conftest._shards(items, 1)[0]) == sorted(ids)
