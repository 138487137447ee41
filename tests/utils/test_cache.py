"""The cache: complete entries or none, one builder at a time, bounded waits, readable by every user."""
import fcntl
import json
import stat

import pytest

from twinkle.utils import cache


@pytest.fixture
def root(monkeypatch, tmp_path):
    monkeypatch.setenv('TWINKLE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(cache, '_verified', {})
    return tmp_path / 'cache'


def build_two_files(directory):
    (directory / 'a.txt').write_text('alpha')
    (directory / 'sub').mkdir()
    (directory / 'sub' / 'b.bin').write_bytes(b'\x00' * 1000)


def test_materialise_builds_once_with_a_manifest_and_readable_modes(root):
    calls = []
    target = cache.entry('assets', 'thing')
    built = cache.materialise(target, lambda d: (calls.append(d), build_two_files(d)), 'test asset')
    assert built == target and len(calls) == 1
    assert cache.materialise(target, lambda d: calls.append(d), 'test asset') == target and len(calls) == 1
    manifest = json.loads((target / cache.MANIFEST).read_text())['files']
    assert manifest.keys() == {'a.txt', 'sub/b.bin'} and manifest['sub/b.bin']['size'] == 1000
    assert stat.S_IMODE(target.stat().st_mode) & 0o055 == 0o055  # group/others may list and enter it
    assert stat.S_IMODE((target / 'sub' / 'b.bin').stat().st_mode) & 0o044 == 0o044
    assert not [p for p in target.parent.iterdir() if '.tmp-' in p.name]  # no staging left behind


@pytest.mark.parametrize('damage, reason', [
    (lambda t: (t / cache.MANIFEST).unlink(), 'no .twinkle-manifest.json'),
    (lambda t: (t / 'a.txt').unlink(), 'a.txt is missing'),
    (lambda t: (t / 'sub' / 'b.bin').write_bytes(b'\x00' * 10), 'sub/b.bin has 10 bytes, the manifest says 1000'),
    (lambda t: (t / 'a.txt').write_text('gamma'), 'a.txt does not match its recorded SHA-256'),
], ids=['no_manifest', 'missing_file', 'truncated', 'altered'])
def test_a_broken_entry_is_rebuilt_with_a_warning(root, twinkle_logs, damage, reason):
    target = cache.materialise(cache.entry('assets', 'thing'), build_two_files, 'test asset')
    damage(target)
    cache._verified.clear()  # as a new process would: hashes are checked once per process
    assert reason in cache.verify_manifest(target)
    cache.materialise(target, build_two_files, 'test asset')
    assert cache.verify_manifest(target) is None and (target / 'a.txt').read_text() == 'alpha'
    warnings = [r.getMessage() for r in twinkle_logs.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and reason in warnings[0] and 'rebuilding' in warnings[0]


def test_a_failed_build_leaves_nothing(root):
    def failing(directory):
        (directory / 'half').write_text('x')
        raise RuntimeError('simulated build failure')

    target = cache.entry('assets', 'thing')
    with pytest.raises(RuntimeError, match='simulated build failure'):
        cache.materialise(target, failing, 'test asset')
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.is_dir()]


def test_a_held_lock_times_out_with_a_named_error(root, monkeypatch):
    lock = cache.entry('assets', '.thing.lock')
    lock.parent.mkdir(parents=True)
    with open(lock, 'a') as holder:  # another builder, alive (a separate open file description)
        fcntl.flock(holder, fcntl.LOCK_EX)
        monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, '0.5')
        with pytest.raises(cache.CacheLockTimeout, match=r'waited 0 s for another process building test asset '
                                                         r'.*thing\.lock.*TWINKLE_CACHE_LOCK_TIMEOUT'):
            cache.materialise(cache.entry('assets', 'thing'), build_two_files, 'test asset')


@pytest.mark.parametrize('value', ['soon', '0', '-3', 'inf'])
def test_lock_timeout_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv(cache.LOCK_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f'TWINKLE_CACHE_LOCK_TIMEOUT must be a positive number of seconds, '
                                         f'got {value!r}'):
        cache.lock_timeout()


def test_an_unusable_cache_path_says_to_set_twinkle_cache(monkeypatch, tmp_path):
    """A cache path nobody can create (under a regular file; a read-only HOME fails the same way for
    non-root users, but root writes anywhere) names the fix."""
    blocker = tmp_path / 'file'
    blocker.write_text('not a directory')
    monkeypatch.delenv('TWINKLE_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(blocker / 'cache'))
    with pytest.raises(PermissionError, match=r'cannot write its cache at .*file/cache/twinkle.*set TWINKLE_CACHE'):
        cache.cache_root()
