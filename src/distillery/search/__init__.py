"""Student architecture search without training (DisWOT, Dong et al., CVPR 2023).

* :mod:`~distillery.search.proxies` -- training-free scores ``(teacher, student, batch) -> float``:
  DisWOT's semantic and relation similarities and their sum, plus baselines (parameters, MACs,
  NASWOT, SynFlow, grad-norm);
* :mod:`~distillery.search.space` -- a space over the model zoo's families, with limits on
  parameters, MACs and measured CPU latency;
* :mod:`~distillery.search.evolution` -- aging evolution (Real et al. 2019) over a proxy;
* :mod:`~distillery.search.config` -- the ``run:`` + ``search:`` YAML;
* :mod:`~distillery.search.runner` -- ``distillery search``: outputs and ``--distill-top``.

    from distillery.search import load_search_config, run_search
    result = run_search(load_search_config("configs/search_fmnist.yaml"))
    result.top[0].config        # a ready-to-run distil config
"""
from distillery.search.config import SearchConfig, load_search_config, search_config_from_dict
from distillery.search.proxies import PROXIES, get_proxy
from distillery.search.runner import SearchResult, distill_top, run_search
from distillery.search.space import Candidate, SearchError, Space

__all__ = [
    "PROXIES",
    "Candidate",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "Space",
    "distill_top",
    "get_proxy",
    "load_search_config",
    "run_search",
    "search_config_from_dict",
]
