# -*- coding: utf-8 -*-
"""
Hook loaded by the ``wstest`` wrapper into wstest's own Python 2.7 process
(it is not a pytest module and never runs under Python 3).

Pub/Sub delivers a message to whoever is subscribed at that moment, so if
every test case used the same wsproxy session, a late echo of one case could
land in the socket of the next case. With this hook, wstest's fuzzingclient
connects each test case to its own URL (i.e. its own session and token):

    WSTEST_CASE_URLS=urls.json wstest -m fuzzingclient -s spec.json

where urls.json maps case ids to URLs, e.g.
``{"1.1.1": "ws://127.0.0.1:8080/autobahn/ws/s-1-1-1?access_token=..."}``.
The spec's server "url" is used only for cases missing from the map.

``wstest --list-cases spec.json`` prints, as a JSON list, the case ids the
spec selects (its "cases" minus "exclude-cases"; agent exclusions ignored).
"""

import json
import sys


def list_cases(spec_path):
    from autobahntestsuite import fuzzing
    from autobahntestsuite.caseset import CaseSet

    with open(spec_path) as f:
        spec = json.load(f)
    case_set = CaseSet(fuzzing.CaseSetname, fuzzing.CaseBasename, fuzzing.Cases,
                       fuzzing.CaseCategories, fuzzing.CaseSubCategories)
    sys.stdout.write(json.dumps(case_set.parseSpecCases(spec)) + "\n")


def install(urls_path):
    from autobahntestsuite import fuzzing

    with open(urls_path) as f:
        urls = json.load(f)

    base = fuzzing.FuzzingClientFactory

    class PerCaseUrlFuzzingClientFactory(base):
        """
        fuzzingclient that switches the session URL before every case.
        Host and port stay those of the spec's server, so wstest's
        reconnect-the-same-connector logic keeps working.
        """

        def nextCase(self):
            more = base.nextCase(self)
            if more:
                url = urls.get(self.currentCaseId)
                if url is not None:
                    self.setSessionParameters(url=str(url),
                                              origin=self.origin,
                                              protocols=self.protocols,
                                              useragent=self.useragent,
                                              headers=self.headers)
            return more

    fuzzing.FuzzingClientFactory = PerCaseUrlFuzzingClientFactory
