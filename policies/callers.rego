# The front door: who may submit which tasks, for whom, and how much.
#
# input.caller  the verified caller: {"name", "kind": "user" | "service"}
# input.agent   the agent the task asks for
# input.user    the user the task acts for, proven by their own token (null: nobody)
# data.callers  the callers registry (callers.yaml): users and services with their rights
#
# data.airlock.callers.decision is {"allow", "reasons", "quota"}; every reason names its rule.
# The quota is this policy's to set; the store counts against it as it records the task, in
# the same step, so concurrent submits cannot all slip under it (refusals name
# callers.concurrent or callers.per_minute). The decision depends on nothing but this input
# and the bundle, so the front door reuses it until either changes.
package airlock.callers

import rego.v1

caller := input.caller

registry := data.callers.users if caller.kind == "user"

registry := data.callers.services if caller.kind == "service"

rights := registry[caller.name]

known if rights

concurrent := rights.concurrent if {
	known
	rights.concurrent != null
} else := data.callers.default_quota.concurrent

per_minute := rights.per_minute if {
	known
	rights.per_minute != null
} else := data.callers.default_quota.per_minute

decision := {
	"allow": count(reasons) == 0,
	"reasons": sort(reasons),
	"quota": {"concurrent": concurrent, "per_minute": per_minute},
}

# --- who ---------------------------------------------------------------------------------

reasons contains msg if {
	not known
	msg := sprintf("callers.registered: %s '%s' is not a registered caller", [caller.kind, caller.name])
}

# --- which agents ------------------------------------------------------------------------

reasons contains msg if {
	known
	not agent_allowed
	msg := sprintf("callers.agents: %s '%s' may not run agent '%s'", [caller.kind, caller.name, input.agent])
}

agent_allowed if "*" in rights.agents

agent_allowed if input.agent in rights.agents

# --- for whom ----------------------------------------------------------------------------
# A user acting for themselves needs no right; acting for anyone else needs act_for, and
# (checked before this policy runs) that user's own token.

reasons contains msg if {
	known
	input.user != null
	input.user != caller.name
	not acts_for_allowed
	msg := sprintf("callers.act_for: %s '%s' may not act for '%s'", [caller.kind, caller.name, input.user])
}

acts_for_allowed if "*" in rights.act_for

acts_for_allowed if {
	some pattern in rights.act_for
	data.airlock.admission.user_matches(pattern, input.user)
}
