{{/*
The gateway's YAML config (`quiver gateway --config`), built from values: the settings under
gateway.config, plus the listen address and metrics port and one route per public model whose variants are the
enabled server variants, each pointing at its Service, with its `gateway.fallbacks` list. Secrets (admin key, key store, Redis
URL) are not here: the Deployment sets them as QUIVER_GATEWAY_* env vars from the Secret.
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
{{- $_ = set $config.rate_limit "backend" "redis" }}
{{- $_ = set $config.cache "backend" "redis" }}
{{- end }}
{{- $routes := dict }}
{{- range $name := include "quiver.server.names" . | fromJsonArray }}
{{- $server := mergeOverwrite (deepCopy $.Values.serverDefaults) (deepCopy (get $.Values.servers $name | default dict)) }}
{{- $model := include "quiver.server.model" (dict "root" $ "server" $server) }}
{{- $url := printf "http://%s:%d" (include "quiver.server.fullname" (dict "root" $ "name" $name)) (int $server.port) }}
{{- $variant := dict "name" $name "weight" $server.weight "replicas" (list $url) }}
{{- /* the Service is the gateway's one replica of the variant: its slots are the Service's */}}
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
