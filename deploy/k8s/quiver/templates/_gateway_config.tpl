{{/*
The gateway's YAML config (`quiver gateway --config`), built from values: the settings under
gateway.config, plus the listen address and metrics port and one route per public model whose variants are the
enabled server variants, each pointing at its headless Service (`discovery: dns`: the gateway
balances the pods itself; `gateway.podDiscovery: false` points at the ClusterIP Service instead), with its `gateway.fallbacks` list. Secrets (admin key, key store, Redis
URL) are not here: the Deployment sets them as QUIVER_GATEWAY_* env vars from the Secret.
With Redis (which more than one gateway replica requires) the rate limits, the response cache
and the route state (canary weights, rollbacks, judging windows) all live in it, so every
replica obeys one `PUT /admin/routes` and a restart loses nothing.
*/}}
{{- define "quiver.gateway.config" -}}
{{- $config := deepCopy .Values.gateway.config }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ = set $config "port" (int .Values.gateway.port) }}
{{- $_ = set $config "metrics_port" (int .Values.gateway.metricsPort) }}
{{- if not (include "quiver.redis.used" .) }}
{{- $_ = set $config "key_store" "/data/keys.db" }}
{{- else }}
{{- $_ = set $config "rate_limit" (merge (dict "backend" "redis") ($config.rate_limit | default dict)) }}
{{- $_ = set $config "cache" (merge (dict "backend" "redis") ($config.cache | default dict)) }}
{{- $_ = set $config "routing" (merge (dict "backend" "redis") ($config.routing | default dict)) }}
{{- $_ = set $config.rate_limit "backend" "redis" }}
{{- $_ = set $config.cache "backend" "redis" }}
{{- $_ = set $config.routing "backend" "redis" }}
{{- end }}
{{- $routes := dict }}
{{- range $name := include "quiver.server.names" . | fromJsonArray }}
{{- $server := mergeOverwrite (deepCopy $.Values.serverDefaults) (deepCopy (get $.Values.servers $name | default dict)) }}
{{- $model := include "quiver.server.model" (dict "root" $ "server" $server) }}
{{- $service := include "quiver.server.fullname" (dict "root" $ "name" $name) }}
{{- if $.Values.gateway.podDiscovery }}{{ $service = printf "%s-pods" $service }}{{ end }}
{{- $url := printf "http://%s:%d" $service (int $server.port) }}
{{- $variant := dict "name" $name "weight" $server.weight "replicas" (list $url) }}
{{- if $.Values.gateway.podDiscovery }}
{{- $_ := set $variant "discovery" "dns" }}
{{- end }}
{{- /* a replica is a pod with podDiscovery, else the Service: its slots */}}
{{- $_ := set $variant "max_concurrency_per_replica" (ternary (int $server.gatewayMaxConcurrency) nil (gt (int ($server.gatewayMaxConcurrency | default 0)) 0)) }}
{{- if and $server.servedModelName (ne $server.servedModelName $model) }}
{{- $_ := set $variant "upstream_model" $server.servedModelName }}
{{- end }}
{{- $_ := set $routes $model (append (get $routes $model | default list) $variant) }}
{{- end }}
{{- $models := list }}
{{- range $model, $variants := $routes }}
{{- $stable := (index $variants 0).name }}
{{- range $variants }}{{ if eq .name "stable" }}{{ $stable = "stable" }}{{ end }}{{ end }}
{{- $route := dict "name" $model "stable" $stable "variants" $variants }}
{{- with get ($.Values.gateway.fallbacks | default dict) $model }}
{{- $_ := set $route "fallbacks" . }}
{{- end }}
{{- $models = append $models $route }}
{{- end }}
{{- $_ = set $config "models" $models }}
{{- toYaml $config }}
{{- end }}
