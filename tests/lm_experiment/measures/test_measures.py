"""The registry: what `scoring.evaluate_length` writes is exactly what the registered measures give."""

from lm_experiment.measures import MEASURES


def test_an_entry_is_the_registered_measures_in_order(hand_made):
    entry, _ = hand_made()
    keys = [key for measure in MEASURES for key in measure.keys]
    assert list(entry) == ["length", "documents", "windows", "tokens", *keys]
    assert len({measure.name for measure in MEASURES}) == len(MEASURES)


def test_every_typed_result_reads_back_what_it_wrote(hand_made):
    entry, _ = hand_made()
    for measure in MEASURES:
        result = measure.read(entry)
        assert result.to_json() == {key: entry[key] for key in measure.keys}, measure.name
