"""The region journal on its own: keys, writers of other keys, unreadable files (the predictor's use of it is
tested in test_inference.py)."""

import logging

import numpy as np

from nucleiseg_monai.region_journal import RegionJournal, journal_folder, pack, remove_journal, unpack

K1 = {"settings": {"min_size": 60}, "source_fingerprint": "a"}
K2 = {"settings": {"min_size": 40}, "source_fingerprint": "a"}
LABELS = np.arange(12, dtype=np.uint32).reshape(3, 4)


def _kept_files(out, name="slide"):
    return sorted(p.relative_to(journal_folder(out, name)).as_posix()
                  for p in journal_folder(out, name).rglob("r*.npy.z"))


def test_labels_travel_exactly_in_the_smallest_type():
    for labels in (LABELS, LABELS + 2**16):
        back = unpack(pack(labels))
        assert back.dtype == np.uint32 and np.array_equal(back, labels)
    assert len(pack(LABELS)) < len(pack(LABELS + 2**16))


def test_a_claim_takes_its_own_keys_regions_and_discards_another_keys_saying_what_differs(tmp_path, caplog):
    first = RegionJournal.claim(tmp_path, "slide", K1)
    assert np.array_equal(unpack(first.save((0, 1), LABELS)), LABELS)  # packed as written, for a band task to send
    again = RegionJournal.claim(tmp_path, "slide", K1)
    assert (0, 1) in again and np.array_equal(again.load((0, 1), (3, 4)), LABELS)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai"):
        other = RegionJournal.claim(tmp_path, "slide", K2)
    assert len(other) == 0 and "1 regions of an interrupted run with other settings are discarded" in caplog.text
    assert RegionJournal.join(tmp_path, "slide", K1) is None and RegionJournal.join(tmp_path, "slide", K2) is not None


def test_a_writer_of_another_key_never_writes_into_a_claimed_journal_nor_recreates_a_removed_one(tmp_path):
    stale = RegionJournal.claim(tmp_path, "slide", K1)  # e.g. a cohort's task still running on a cluster
    RegionJournal.claim(tmp_path, "slide", K2)
    assert stale.save((0, 0), LABELS) is None
    assert _kept_files(tmp_path) == [] and not stale.active
    assert len(RegionJournal.claim(tmp_path, "slide", K2)) == 0

    current = RegionJournal.claim(tmp_path, "slide", K2)
    remove_journal(tmp_path, "slide")  # the image's outputs were committed
    current.save((0, 0), LABELS)
    assert not journal_folder(tmp_path, "slide").exists()


def test_a_kept_region_unreadable_or_of_another_shape_is_deleted_and_computed_again(tmp_path, caplog):
    journal = RegionJournal.claim(tmp_path, "slide", K1)
    journal.save((0, 0), LABELS)
    journal.save((0, 1), LABELS)
    (journal.folder / "r0-1.npy.z").write_bytes(b"half a region")
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai"):
        assert journal.load((0, 0), (4, 3)) is None and journal.load((0, 1), (3, 4)) is None
    assert "3x4 px where the region is 4x3" in caplog.text and "could not be read" in caplog.text
    assert (0, 0) not in journal and _kept_files(tmp_path) == []


def test_a_journal_that_cannot_be_written_is_given_up_with_one_warning(tmp_path, monkeypatch, caplog):
    journal = RegionJournal.claim(tmp_path, "slide", K1)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nucleiseg_monai.region_journal.pack", full)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai"):
        journal.save((0, 0), LABELS)
        journal.save((0, 1), LABELS)
    assert not journal.active and caplog.text.count("can no longer be kept") == 1
    assert list(journal.folder.glob(".*")) == []  # no temporary left
