#!/usr/bin/env bash
# Kafka ACLs for streamagent on a real cluster (README: "Trust: who may write what"). Each component
# authenticates to Kafka as its own principal (SASL or mTLS; STREAMAGENT_KAFKA_* settings) and may write
# only the topics whose events it writes; upstream systems may write only the intake topic.
#
# ACLs decide who may *write a topic*; event signatures (streamagent/authn.py) decide who *wrote a record*
# and are checked where the record is used. Either alone leaves a gap: with ACLs only, any component with a
# leaked password writes anything its topics carry (a tool's principal can write agent.tool.results, so
# without signatures it could answer for another tool); with signatures only, anyone can fill a topic with
# records that are refused (a flood, not a forgery). Together: a producer can neither reach a topic that is
# not its own nor forge a record on one that is.
#
# usage: BOOTSTRAP=broker:9092 [PREFIX=] [TOOLS="enrich jira draft email slack"] [CONFIG=admin.properties] ops/kafka/acls.sh
set -euo pipefail
: "${BOOTSTRAP:?set BOOTSTRAP=host:port of the cluster}"
PREFIX="${PREFIX:-}"
TOOLS="${TOOLS:-enrich jira draft email slack}"
ACLS="${KAFKA_ACLS:-kafka-acls.sh}"
args=(--bootstrap-server "$BOOTSTRAP")
[ -n "${CONFIG:-}" ] && args+=(--command-config "$CONFIG")

allow() {  # allow PRINCIPAL OPERATION RESOURCE-FLAGS...
    local principal="$1" operation="$2"; shift 2
    "$ACLS" "${args[@]}" --add --allow-principal "$principal" --operation "$operation" "$@"
}
topic() { echo --topic "$PREFIX$1"; }
group() { echo --group "${PREFIX}streamagent.$1"; }  # Settings.group: <prefix>streamagent.<name>

# Upstream systems (CRMs, signup forms, webhook relays): the intake topics, nothing else (requests, and
# changes of shared memory).
allow "User:upstream" Write $(topic agent.run.requests)
allow "User:upstream" Describe $(topic agent.run.requests)
allow "User:upstream" Write $(topic agent.memory.requests)
allow "User:upstream" Describe $(topic agent.memory.requests)

# Intake: reads requests, appends signed RunRequested events to the run log and admitted memory writes
# to the memory processor's topic.
allow "User:intake" Read $(topic agent.run.requests)
allow "User:intake" Read $(topic agent.memory.requests)
allow "User:intake" Read $(group intake)
allow "User:intake" Write $(topic agent.run.events)
allow "User:intake" Write $(topic agent.memory.writes)

# Memory processor: the one writer of each entity: reads admitted writes, publishes entity versions (it
# reads its own topic back, from the start, for its table).
allow "User:memory" Read $(topic agent.memory.writes)
allow "User:memory" Read $(group memory)
allow "User:memory" Read $(topic agent.memory)
allow "User:memory" Write $(topic agent.memory)

# State processor: folds the run log and the results; writes snapshots, its timer events, its changelog.
allow "User:state" Read $(topic agent.run.events)
allow "User:state" Read $(topic agent.tool.results)
allow "User:state" Read $(group state)
allow "User:state" Write $(topic agent.run.state)
allow "User:state" Write $(topic agent.run.events)
# A child run's end is its parent step's result (child workflows): the state processor writes it there.
allow "User:state" Write $(topic agent.tool.results)
allow "User:state" All --topic "${PREFIX}streamagent.state-" --resource-pattern-type prefixed  # faust's changelog

# Decision processor: reads snapshots and the tool registry; writes decisions and every command topic.
allow "User:decision" Read $(topic agent.run.state)
allow "User:decision" Read $(topic agent.tools.registry)
allow "User:decision" Read $(group decision)
allow "User:decision" Read $(group catalogue)
allow "User:decision" Write $(topic agent.run.events)
allow "User:decision" Write --topic "${PREFIX}agent.tool.commands." --resource-pattern-type prefixed
# Shared memory: its table of agent.memory (the memory watch), and what succeeded steps write.
allow "User:decision" Read $(topic agent.memory)
allow "User:decision" Write $(topic agent.memory.writes)

# Projection: reads the run log, the results and the commands (audit); writes only dead letters.
allow "User:projection" Read $(topic agent.run.events)
allow "User:projection" Read $(topic agent.tool.results)
allow "User:projection" Read --topic "${PREFIX}agent.tool.commands." --resource-pattern-type prefixed
allow "User:projection" Read $(topic agent.memory)
allow "User:projection" Read $(group projection)

# Each tool: its own command topic and group; writes results and its registry announcements.
for tool in $TOOLS; do
    allow "User:tool-$tool" Read $(topic "agent.tool.commands.$tool")
    allow "User:tool-$tool" Read $(group "tool.$tool")
    allow "User:tool-$tool" Write $(topic agent.tool.results)
    allow "User:tool-$tool" Write $(topic agent.tools.registry)
    allow "User:tool-$tool" Read $(topic agent.memory)  # the staleness check before a call
done

# Operators (approve, deny): the run log only; the event is refused unless it carries an operator key.
allow "User:operator" Write $(topic agent.run.events)

# Every component may dead-letter what it cannot process; operators read and replay dead letters.
for principal in intake memory state decision projection operator $(for t in $TOOLS; do echo "tool-$t"; done); do
    allow "User:$principal" Write $(topic agent.dlq)
done
allow "User:operator" Read $(topic agent.dlq)

# Every member announces its partitions, lag and work on agent.members (`streamagent status`); operators
# read it. An operational view, not part of any run: nothing decides on it, so it is not signed. (The
# state processor's checkpoints, `streamagent.state-runs-checkpoint`, fall under its prefixed grant above:
# like its changelog, only the state principal may write them.)
for principal in intake memory state decision projection $(for t in $TOOLS; do echo "tool-$t"; done); do
    allow "User:$principal" Write $(topic agent.members)
done
allow "User:operator" Read $(topic agent.members)
