"""The layout's numbers: parsing dp_replicate, filling in auto sizes, the expert-mesh sizes."""

import pytest

from parallel.layout import Layout, parse_dp_replicate, resolve_layout


@pytest.mark.parametrize("value,expected", [("auto", None), (2, 2), ("2", 2), (" 3 ", 3), (1, 1)])
def test_dp_replicate_reads_ints_digit_strings_and_auto(value, expected):
    assert parse_dp_replicate(value) == expected


@pytest.mark.parametrize("value", ["two", "0", 0, -1, "-1", 2.0, True, None, "2.5", ""])
def test_dp_replicate_rejects_anything_else_naming_the_value(value):
    with pytest.raises(ValueError, match=rf"parallel.dp_replicate={value}: allowed: an int >= 1 or 'auto'"):
        parse_dp_replicate(value)


def test_a_string_dp_replicate_resolves_like_the_int():
    assert resolve_layout(8, 1, "2", -1, 2) == resolve_layout(8, 1, 2, -1, 2) == Layout(8, 1, 2, 4, 2)


@pytest.mark.parametrize(
    "world,pp,dp_replicate,dp_shard,ep,expected",
    [
        (8, 1, "auto", -1, 1, (1, 8)),
        (8, 2, "auto", -1, 1, (1, 4)),
        (8, 1, 2, -1, 1, (2, 4)),
        (8, 1, "auto", 2, 1, (4, 2)),
        (12, 1, 3, 4, 1, (3, 4)),
    ],
)
def test_auto_sizes_fill_the_world(world, pp, dp_replicate, dp_shard, ep, expected):
    layout = resolve_layout(world, pp, dp_replicate, dp_shard, ep)
    assert (layout.dp_replicate, layout.dp_shard) == expected
    assert layout.pp * layout.dp == world


# (dp_replicate, dp_shard, ep) -> (edp_replicate, edp_shard): the expert mesh regroups the
# dp ranks as edp_replicate x edp_shard x ep.
EXPERT_MESH = [
    ((1, 8, 1), (1, 8)),  # no EP: experts shard like dense weights
    ((1, 8, 2), (1, 4)),  # ep within dp_shard: the rest of the shard group shards each expert
    ((1, 8, 8), (1, 1)),  # ep = dp_shard: whole experts, one copy each
    ((2, 4, 2), (2, 2)),  # HSDP: replicas keep their copies of each expert shard
    ((2, 4, 4), (2, 1)),
    ((2, 4, 8), (1, 1)),  # ep spans both replicas: every rank holds different experts
    ((4, 2, 4), (2, 1)),  # ep a multiple of dp_shard: two replica groups form one EP group
]


@pytest.mark.parametrize("sizes,expected", EXPERT_MESH, ids=[f"r{r}xs{s}-ep{e}" for (r, s, e), _ in EXPERT_MESH])
def test_expert_mesh_sizes(sizes, expected):
    dp_replicate, dp_shard, ep = sizes
    layout = resolve_layout(dp_replicate * dp_shard, 1, dp_replicate, dp_shard, ep)
    assert (layout.edp_replicate, layout.edp_shard) == expected
    # Every data-parallel rank appears exactly once in the expert mesh.
    assert layout.edp_replicate * layout.edp_shard * layout.ep == layout.dp


@pytest.mark.parametrize(
    "args,message",
    [
        ((8, 1, 3, -1, 1), "parallel.dp_replicate=3: must divide the 8 data-parallel ranks"),
        ((8, 1, "auto", 3, 1), "parallel.dp_shard=3: must divide the 8 data-parallel ranks"),
        ((8, 1, 2, 2, 1), "= 4, but the world size is 8"),
        ((8, 3, "auto", -1, 1), "parallel.pp=3: must divide the world size 8"),
        ((6, 1, 1, 6, 4), "parallel.ep=4: must divide the 6 data-parallel ranks"),
        ((12, 1, 2, 6, 4), "parallel.ep=4: must divide parallel.dp_shard=6 or be a multiple of it"),
    ],
)
def test_impossible_layouts_name_the_bad_value(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(*args)
