import yaml

from tributary.contracts.asyncapi import render
from tributary.contracts.catalog import catalog


def test_the_committed_asyncapi_document_is_current() -> None:
    cat = catalog()
    committed = (cat.root / "asyncapi.yaml").read_text(encoding="utf-8")
    assert committed == render(cat), "contracts/asyncapi.yaml is stale: run `make contracts`"


def test_every_version_has_a_channel_a_sender_and_its_receivers() -> None:
    doc = yaml.safe_load(render(catalog()))
    assert doc["asyncapi"] == "3.0.0"
    for spec in catalog():
        for version in spec.versions.values():
            key = version.routing_key
            assert doc["channels"][key]["address"] == key
            assert spec.producers
            for producer in spec.producers:
                assert doc["operations"][f"{producer}.send.{key}"]["action"] == "send"
            for consumer in spec.consumers:
                assert doc["operations"][f"{consumer}.receive.{key}"]["action"] == "receive"
