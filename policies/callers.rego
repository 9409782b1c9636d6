# The front door: who may submit which tasks, for whom, and how much.
#
# input.caller  the verified caller: {"name", "kind": "user" | "service"}
# input.agent   the agent the task asks for
# input.user    the user the task acts for, proven by their own token (null: nobody)
# input.usage   {"running": tasks of this caller not yet ended, "last_minute": submitted in 60 s}
# data.callers  the callers registry (callers.yaml): users and services with their rights
#
# data.airlock.callers.decision is {"allow", "reasons", "quota"}; every reason names its rule.
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

# --- how much ----------------------------------------------------------------------------

reasons contains msg if {
	known
	input.usage.running >= concurrent
	msg := sprintf("callers.concurrent: %s '%s' has %d tasks running (quota %d)", [caller.kind, caller.name, input.usage.running, concurrent])
}

reasons contains msg if {
	known
	input.usage.last_minute >= per_minute
	msg := sprintf("callers.per_minute: %s '%s' submitted %d tasks in the last minute (quota %d)", [caller.kind, caller.name, input.usage.last_minute, per_minute])
}
