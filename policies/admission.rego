# Admission and grants for Airlock tasks.
#
# input.task        the task spec (unset fields are null)
# input.agent       the agent's registry entry, or null when no such agent exists
# input.deployment  facts about this deployment: runner image, runtimes, defaults, trust domain
#
# data.airlock.admission.decision is {"allow": false, "reasons": [...]} or
# {"allow": true, "reasons": [], "grant": {...}}. The grant is the intersection of what the
# task asked for with what its agent may have; a task that asks for nothing gets the
# agent's defaults. Anything not granted here is denied downstream.
package airlock.admission

import rego.v1

task := input.task

agent := input.agent

deployment := input.deployment

known if agent != null

# --- the decision ----------------------------------------------------------------------

decision := {"allow": false, "reasons": sort(reasons)} if count(reasons) > 0

decision := {"allow": true, "reasons": [], "grant": grant} if count(reasons) == 0

grant := {
	"agent": agent.name,
	"identity": sprintf("spiffe://%s/agent/%s", [deployment.trust_domain, agent.name]),
	"on_behalf_of": task.on_behalf_of,
	"image": image,
	"runtime": runtime,
	"timeout_s": timeout_s,
	"limits": limits,
	"egress": egress,
	"tools": tools,
	"mcp_reads": mcp_reads,
	"secrets": secrets,
	"vault_policies": agent.vault_policies,
}

# --- identity ----------------------------------------------------------------------------

reasons contains msg if {
	not known
	msg := sprintf("unknown agent '%s'", [task.agent])
}

# --- image ---------------------------------------------------------------------------------

image := task.image if task.image != null

image := deployment.runner_image if task.image == null

image_allowed if {
	some pattern in agent.images
	name_matches(pattern, image)
}

name_matches(pattern, name) if pattern == name

name_matches(pattern, name) if {
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}

reasons contains msg if {
	known
	not image_allowed
	msg := sprintf("image '%s' is not allowed for agent '%s'", [image, agent.name])
}

# --- time and resources --------------------------------------------------------------------

timeout_s := task.timeout_s if task.timeout_s != null

timeout_s := smaller(deployment.default_timeout_s, agent.max_timeout_s) if task.timeout_s == null

reasons contains msg if {
	known
	timeout_s > agent.max_timeout_s
	msg := sprintf("timeout_s %v exceeds agent '%s' maximum of %v", [timeout_s, agent.name, agent.max_timeout_s])
}

reasons contains msg if {
	timeout_s > deployment.max_timeout_s
	msg := sprintf("timeout_s %v exceeds this deployment's maximum of %v", [timeout_s, deployment.max_timeout_s])
}

limit_names := ["cpus", "memory", "pids"]

limits := object.union(default_limits, {name: v | some name, v in task.limits; v != null})

default_limits := {name: smaller(deployment.default_limits[name], agent.max_limits[name]) | some name in limit_names}

# The numeric comparison operators, not the min() builtin: min() compares some engines'
# numbers as text.
smaller(a, b) := a if a <= b

smaller(a, b) := b if a > b

reasons contains msg if {
	known
	some name, value in limits
	value > agent.max_limits[name]
	msg := sprintf("limits.%s %v exceeds agent '%s' maximum of %v", [name, value, agent.name, agent.max_limits[name]])
}

# --- isolation -----------------------------------------------------------------------------

runtime := "runsc" if agent.isolation == "gvisor"

runtime := "runc" if agent.isolation == "runc"

reasons contains msg if {
	known
	not runtime in deployment.runtimes
	msg := sprintf("agent '%s' needs isolation class %s, but this host's engine has no '%s' runtime", [agent.name, agent.isolation, runtime])
}

# --- delegation ----------------------------------------------------------------------------

reasons contains msg if {
	known
	task.on_behalf_of != null
	not agent.delegation.allowed
	msg := sprintf("agent '%s' may not act on behalf of users", [agent.name])
}

reasons contains msg if {
	known
	task.on_behalf_of != null
	agent.delegation.allowed
	not delegation_allowed
	msg := sprintf("agent '%s' may not act on behalf of '%s'", [agent.name, task.on_behalf_of])
}

delegation_allowed if {
	some pattern in agent.delegation.users
	user_matches(pattern, task.on_behalf_of)
}

user_matches(pattern, user) if pattern == user

# "*@domain" matches one address of exactly that domain: one "@", a local part before it,
# and the domain after it equal to the pattern's (no suffix tricks: "a@evil.test@domain",
# "@domain" and "a@sub.domain" do not match).
user_matches(pattern, user) if {
	startswith(pattern, "*@")
	parts := split(user, "@")
	count(parts) == 2
	parts[0] != ""
	lower(parts[1]) == lower(trim_prefix(pattern, "*@"))
}

# --- egress --------------------------------------------------------------------------------

egress := sort([rule_grant(rule) | some rule in agent.egress; rule.default]) if task.scopes.egress == null

egress := sort({narrow(rule, asked) |
	some asked in task.scopes.egress
	some rule in agent.egress
	covers(rule, asked)
}) if task.scopes.egress != null

rule_grant(rule) := {
	"host": rule.host, "ports": rule.ports, "methods": rule.methods, "paths": rule.paths,
	"internal": rule.internal, "upstream_tls": rule.upstream_tls, "inject": rule.inject,
	"name": rule.name, "enforce": rule.enforce, "scheme": rule.scheme, "tls": rule.tls,
}

narrow(rule, asked) := {
	"host": asked.host,
	"ports": pick(asked.ports, rule.ports),
	"methods": pick(asked.methods, rule.methods),
	"paths": pick(asked.paths, rule.paths),
	"internal": rule.internal,
	"upstream_tls": rule.upstream_tls,
	"inject": rule.inject,
	"name": rule.name,
	"enforce": rule.enforce,
	"scheme": rule.scheme,
	"tls": rule.tls,
}

pick(asked, allowed) := allowed if asked == null

pick(asked, _) := asked if asked != null

covers(rule, asked) if {
	host_covers(rule.host, asked.host)
	within(asked.ports, rule.ports)
	within(asked.methods, rule.methods)
	paths_within(asked.paths, rule.paths)
}

# "*.example.com" covers "api.example.com" and "*.api.example.com", never "example.com"
# nor "evil-example.com".
host_covers(pattern, host) if pattern == host

host_covers(pattern, host) if {
	startswith(pattern, "*.")
	endswith(host, trim_prefix(pattern, "*"))
}

within(asked, _) if asked == null

within(asked, allowed) if {
	asked != null
	every item in asked {
		item in allowed
	}
}

paths_within(asked, _) if asked == null

paths_within(_, allowed) if count(allowed) == 0

paths_within(asked, allowed) if {
	asked != null
	every path in asked {
		some prefix in allowed
		startswith(path, prefix)
	}
}

reasons contains msg if {
	known
	some asked in task.scopes.egress
	not egress_covered(asked)
	msg := sprintf("egress to %s (ports %v, methods %v, paths %v) is beyond agent '%s' permissions", [asked.host, asked.ports, asked.methods, asked.paths, agent.name])
}

egress_covered(asked) if {
	some rule in agent.egress
	covers(rule, asked)
}

# --- MCP tools -----------------------------------------------------------------------------

agent_tools[key] := {
	"server": server.name, "url": server.url, "tool": tool.name, "args": tool.args,
	"default": tool.default, "internal": server.internal,
} if {
	some server in agent.mcp
	some tool in server.tools
	key := sprintf("%s/%s", [server.name, tool.name])
}

tools := sort([tool_grant(tool) | some tool in agent_tools; tool.default]) if task.scopes.tools == null

tools := sort({tool_grant(agent_tools[key]) | some key in task.scopes.tools; agent_tools[key]}) if task.scopes.tools != null

# Resources (URI prefixes) and prompts an MCP server offers this agent, granted with it.
mcp_reads := sort([{
	"server": server.name, "url": server.url, "internal": server.internal,
	"resources": server.resources, "prompts": server.prompts,
} |
	some server in agent.mcp
	count(server.resources) + count(server.prompts) > 0
])

tool_grant(tool) := {
	"server": tool.server, "url": tool.url, "tool": tool.tool, "args": tool.args,
	"internal": tool.internal,
}

reasons contains msg if {
	known
	some key in task.scopes.tools
	not agent_tools[key]
	msg := sprintf("tool '%s' is beyond agent '%s' permissions", [key, agent.name])
}

# --- secrets -------------------------------------------------------------------------------

agent_secrets[secret.name] := secret if some secret in agent.secrets

secrets := sort([secret_grant(s) | some s in agent.secrets; s.default]) if task.scopes.secrets == null

secrets := sort({secret_grant(agent_secrets[name]) | some name in task.scopes.secrets; agent_secrets[name]}) if task.scopes.secrets != null

secret_grant(s) := {"name": s.name, "kind": s.kind, "path": s.path, "role": s.role}

reasons contains msg if {
	known
	some name in task.scopes.secrets
	not agent_secrets[name]
	msg := sprintf("secret '%s' is beyond agent '%s' permissions", [name, agent.name])
}
