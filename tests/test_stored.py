"""The stored shape of results.json loses nothing: top-k lists pack and unpack to the same numbers."""

import math

from llama_cachecheck import stored


def test_a_top_k_list_packs_to_a_string_and_back_to_the_same_rounded_numbers():
    top = [[[477, -0.854601], [239, -2.281124], [161, -23.6]], [[60, -0.0], [5, -1e-5], [262143, -17.000004]]]
    packed = stored.pack_top(top)
    assert isinstance(packed, str)
    assert stored.unpack_top(packed) == stored.rounded(top) == [
        [[477, -0.8546], [239, -2.28112], [161, -23.6]], [[60, 0.0], [5, -1e-05], [262143, -17.0]]]


def test_a_list_packed_before_the_byte_planes_still_reads():
    # the first schema-4 files: the two int32 columns deflated, no mark
    old = "eNpjZGBgYAJiRij9Hwj+ATEAJFgH/g=="  # n 1, k 2: ids 1, 2; logprobs -1 and -2 units
    assert stored.unpack_top(old) == [[[1, -1e-05], [2, -2e-05]]]
    assert stored.pack_top([[[1, -1e-05], [2, -2e-05]]]).startswith(stored.PLANES)


def test_a_ragged_or_infinite_list_is_kept_as_a_list():
    ragged = [[[1, -0.5], [2, -1.25]], [[3, -0.1]]]
    infinite = [[[1, -0.5], [2, -math.inf]]]
    assert stored.pack_top(ragged) == ragged and stored.unpack_top(ragged) == ragged
    assert stored.pack_top(infinite) == infinite
    assert stored.pack_top([]) == [] and stored.pack_top(None) is None


def test_a_document_packs_each_row_once_and_expands_to_the_same_document():
    top = [[[1, -0.5], [2, -1.5]], [[2, -0.25], [1, -2.0]]]
    reply = {"tokens": [1, 2], "pieces": ["a", "b"], "text": "ab", "top": top}
    other = {**reply, "tokens": [1, 3], "text": "ac"}
    turn = {"subject": reply, "reference": reply, "scored_top": reply["top"], "messages": [["user", "hi"]],
            "events": [{"kind": "created", "n_tokens": 4}], "distances": [0.0, 0.5], "kls": [0.0, 0.0]}
    case = {"settings": {"n_ctx": 2048}, "thresholds": None, "turns": [turn, {**turn, "reference": other,
                                                                               "scored_top": None, "messages": None}]}
    doc = {"schema": 4, "results": [case, case]}
    packed = stored.pack(doc)
    assert len(packed["replies"]) == 2 and len(packed["messages"]) == 1 and len(packed["settings"]) == 1
    assert packed["results"][0]["turns"][0]["scored_top"] == packed["results"][0]["turns"][0]["subject"]
    assert stored.expand(packed) == doc
