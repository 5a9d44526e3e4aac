"""Fixtures shared by the test modules."""

import pytest

from experiments import kill_resume


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  """A small real-text corpus (four stdlib files), so runs load in milliseconds."""
  return kill_resume.tiny_corpus(tmp_path_factory.mktemp('corpus'))
