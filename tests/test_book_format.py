"""The chapters' code fits the page's code column, setup cells are folded and glue is out of the
teaching cells (tests/book_format.py puts them in that form)."""
import ast

import pytest

from book_format import WIDTH, break_long_lines, chapters, problems, reflow_docstrings, split_glue


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_chapter_is_formatted_for_the_page(path):
    assert problems(path) == [], "run: python tests/book_format.py"


def test_long_comments_and_strings_are_broken_without_changing_the_program():
    code = ("x = compute(1, 2)  # " + "a comment that goes on " * 4 + "\n"
            "print(\n    f\"{'value'}: the quick brown fox jumps over the lazy dog and keeps running {x:.1f}\",\n)")
    out = break_long_lines(code)
    assert all(len(line) <= WIDTH for line in out.split("\n")), out
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(code))  # same program (comments aside)


def test_docstrings_are_reflowed_paragraph_by_paragraph():
    code = 'def f():\n    """' + "word " * 30 + '\n\n    Second paragraph."""\n    return 1'
    out = reflow_docstrings(code)
    assert all(len(line) <= WIDTH for line in out.split("\n"))
    assert ast.get_docstring(ast.parse(out).body[0]).split() == ast.get_docstring(ast.parse(code).body[0]).split()
    assert "\n\n    Second paragraph." in out


def test_glue_moves_out_only_when_it_hands_on_the_same_values():
    teaching, glue = split_glue("a = 1\nglue('a', a)\nb = a + 1\nglue('b', b)\nb")
    assert teaching == "a = 1\nb = a + 1\nb" and glue == "glue('a', a)\nglue('b', b)"
    teaching, glue = split_glue("a = 1\nglue('a', a)\na = 2")  # a changes after the glue: it stays
    assert glue == "" and "glue('a', a)" in teaching
    assert split_glue("glue('x', 1)") == ("glue('x', 1)", "")  # a glue-only cell stays as it is
