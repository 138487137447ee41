"""Selection, overrides, availability errors and fallback logging of the kernel registry."""
import pytest

from twinkle import kernels
from twinkle.kernels import registry
from twinkle.kernels.registry import Impl, KernelUnavailableError


@pytest.fixture
def toy_op(fresh_registry):
    """An op whose preferred backend needs a package that is not installed."""
    registry.register('toy_op', impls={
        'reference': Impl('reference'),
        'fancy': Impl('fancy', packages=('no_such_package_for_twinkle',), extra='liger'),
        'gpu_only': Impl('gpu_only', devices=('cuda',)),
    }, priority={'cpu': ['fancy', 'reference'], '*': ['reference']})
    yield 'toy_op'
    registry._OPS.pop('toy_op')
    registry._chosen().clear()


def test_select_on_cpu_returns_backend_and_reason(fresh_registry):
    choice = kernels.select('rms_norm')
    assert choice.backend in registry.backends_of('rms_norm')
    assert 'priority' in choice.reason


def test_unknown_op_lists_valid_names(fresh_registry):
    with pytest.raises(ValueError, match='rms_norm'):
        kernels.select('no_such_op')


def test_unknown_backend_lists_valid_names(fresh_registry):
    with pytest.raises(ValueError, match=r'valid: reference, .*triton'):
        kernels.configure(rms_norm='cuda_magic')
    with pytest.raises(ValueError, match='valid'):
        kernels.rms_norm(*_tiny_inputs(), backend='cuda_magic')


def test_missing_package_error_names_the_extra(toy_op):
    with pytest.raises(KernelUnavailableError, match=r'no_such_package_for_twinkle.*twinkle\[liger\]'):
        registry.resolve(toy_op, 'fancy')


def test_missing_capability_error_names_it(fresh_registry, monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # set on CPU; CPU tensors then need it on a GPU too
    with pytest.raises(KernelUnavailableError, match='sm70'):
        kernels.rms_norm(*_tiny_inputs(), backend='triton')


def test_wrong_device_family_is_named(toy_op):
    with pytest.raises(KernelUnavailableError, match='runs on cuda, not cpu'):
        registry.resolve(toy_op, 'gpu_only')


def test_fallback_logs_why(toy_op, twinkle_logs):
    choice = registry.select(toy_op)
    assert choice.backend == 'reference'
    assert 'fancy unavailable' in choice.reason
    warnings = [r.getMessage() for r in twinkle_logs.records if r.levelname == 'WARNING']
    assert any('toy_op' in m and 'twinkle[liger]' in m for m in warnings)


def test_choice_logged_once(fresh_registry, twinkle_logs):
    for _ in range(3):
        kernels.select('rms_norm')
    lines = [r for r in twinkle_logs.records if 'kernel rms_norm' in r.getMessage()]
    assert len(lines) == 1


def test_configure_forces_and_clears(fresh_registry):
    kernels.configure(rms_norm='triton')
    assert kernels.select('rms_norm') == ('triton', 'forced by configure()')
    kernels.configure()
    assert kernels.select('rms_norm').reason != 'forced by configure()'


def test_environment_override(fresh_registry, monkeypatch):
    monkeypatch.setenv('TWINKLE_KERNELS', 'rms_norm=triton')
    assert kernels.select('rms_norm') == ('triton', 'forced by TWINKLE_KERNELS')
    monkeypatch.setenv('TWINKLE_KERNELS', 'rms_norm=reference')
    assert kernels.select('rms_norm').backend == 'reference'


@pytest.mark.parametrize('value,message', [('rms_norm', 'op=backend'), ('nope=reference', 'unknown kernel op'),
                                           ('rms_norm=nope', 'unknown backend')])
def test_malformed_environment_override(fresh_registry, monkeypatch, value, message):
    monkeypatch.setenv('TWINKLE_KERNELS', value)
    with pytest.raises(ValueError, match=message):
        kernels.select('rms_norm')


def test_override_to_unavailable_backend_fails_loudly(toy_op, monkeypatch):
    monkeypatch.setenv('TWINKLE_KERNELS', 'toy_op=fancy')
    with pytest.raises(KernelUnavailableError, match='forced by TWINKLE_KERNELS'):
        registry.select(toy_op)


def test_register_requires_reference_and_known_priorities(fresh_registry):
    with pytest.raises(ValueError, match='reference'):
        registry.register('broken', impls={'triton': Impl('triton')}, priority={})
    with pytest.raises(ValueError, match='unknown backends'):
        registry.register('broken', impls={'reference': Impl('reference')}, priority={'cpu': ['magic']})


def test_report_covers_every_op(fresh_registry):
    rows = kernels.report()
    assert {row['op'] for row in rows} == set(kernels.ops())
    for row in rows:
        assert row['backends']['reference'] == 'available'


def _tiny_inputs():
    import torch
    return torch.randn(2, 8), torch.ones(8)


def test_first_call_of_an_op_may_be_inside_a_fullgraph_compile(fresh_registry):
    import torch
    torch._dynamo.reset()
    x, weight = torch.randn(3, 8), torch.rand(8)
    compiled = torch.compile(lambda x, weight: kernels.rms_norm(x, weight, 1e-6) * 2, fullgraph=True,
                             backend='eager')
    assert not registry._chosen()  # nothing selected before tracing
    torch.testing.assert_close(compiled(x, weight), 2 * kernels.rms_norm(x, weight, 1e-6, backend='reference'))


def test_every_backend_that_needs_a_package_names_an_extra_pyproject_has():
    """Walks the whole registry: a backend with an optional package must name the pip extra that
    installs it (so its unavailability reason says what to install), and its module must exist."""
    import importlib.util
    import pathlib
    import tomllib
    pyproject = pathlib.Path(__file__).resolve().parents[2] / 'pyproject.toml'
    extras = tomllib.loads(pyproject.read_text())['project']['optional-dependencies']
    checked = 0
    for op in registry.ops():
        for backend in registry.backends_of(op):
            impl = registry.declaration(op, backend)
            if impl.packages:
                assert impl.extra in extras, f'{op}/{backend} needs {impl.packages} but names no pyproject extra'
                checked += 1
            assert importlib.util.find_spec(registry.module_of(op, backend)) is not None, (op, backend)
    assert checked >= 10
    assert registry.declaration('varlen_attention', 'flash_attn').extra == 'flash-attn'


def test_register_refuses_a_package_without_its_extra(fresh_registry):
    with pytest.raises(ValueError, match='names no pip extra'):
        registry.register('toy_nameless', {'reference': 'reference', 'x': Impl('x', packages=('some_pkg',))})
    assert 'toy_nameless' not in registry.ops()


def test_register_expands_standard_backends_and_filters_default_priority(fresh_registry):
    registry.register('toy_standard', ['reference', 'cpu', 'triton'])
    try:
        assert registry.declaration('toy_standard', 'triton') is registry.TRITON
        assert registry._op('toy_standard').order('cuda') == ['triton', 'reference']  # liger dropped
        assert registry.module_of('toy_standard', 'cpu') == 'twinkle.kernels.toy_standard.cpu'
    finally:
        registry._OPS.pop('toy_standard')
