"""repro.py's table: the paper's three columns, mean +- std over seeds, '-' where a column does not apply."""

import repro


def test_table_has_the_papers_columns_and_seed_statistics():
    rows = {"CLIP": [(None, 0.5, None), (None, 0.7, None)],
            "GDM-FLIP 50%": [(0.40, 0.50, 0.55), (0.60, 0.70, 0.75)]}
    lines = repro.table(rows).splitlines()
    assert lines[0] == "| method | masked inference | unmasked inference | after tuning |"
    assert lines[2] == "| CLIP | - | 60.0 +- 14.1 | - |"
    assert lines[3] == "| GDM-FLIP 50% | 50.0 +- 14.1 | 60.0 +- 14.1 | 65.0 +- 14.1 |"


def test_a_single_seed_has_no_spread():
    assert repro.mean_std([0.123]) == "12.3"
