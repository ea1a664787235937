{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "quiver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-quiver`, or the release name when it already contains the chart name. */}}
{{- define "quiver.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "quiver.gateway.fullname" -}}
{{- printf "%s-gateway" (include "quiver.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quiver.redis.fullname" -}}
{{- printf "%s-redis" (include "quiver.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of a server variant: call with (dict "root" $ "name" $variantName). */}}
{{- define "quiver.server.fullname" -}}
{{- printf "%s-server-%s" (include "quiver.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quiver.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "quiver.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "quiver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quiver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "quiver.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "quiver.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quiver
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Component selector labels: (dict "root" $ "component" "gateway" ["variant" name]). */}}
{{- define "quiver.componentSelectorLabels" -}}
{{ include "quiver.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .variant }}
quiver/variant: {{ . }}
{{- end }}
{{- end }}

{{- define "quiver.componentLabels" -}}
{{ include "quiver.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .variant }}
quiver/variant: {{ . }}
{{- end }}
{{- end }}

{{/* Images ----------------------------------------------------------------------------- */}}

{{/* (dict "root" $ "override" $image "repository" $defaultRepository) */}}
{{- define "quiver.image" -}}
{{- $img := .root.Values.image }}
{{- $override := .override | default dict }}
{{- $repository := $override.repository | default .repository }}
{{- if $img.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $img.registry) $repository }}
{{- end }}
{{- $tag := $override.tag | default $img.tag | default .root.Chart.AppVersion | toString }}
{{- if $override.digest }}
{{- printf "%s:%s@%s" $repository $tag $override.digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/* Servers ----------------------------------------------------------------------------- */}}

{{/* The enabled variants, sorted by name, as a list of names. */}}
{{- define "quiver.server.names" -}}
{{- $names := list }}
{{- range $name, $server := .Values.servers }}
{{- if (mergeOverwrite (deepCopy $.Values.serverDefaults) (deepCopy ($server | default dict))).enabled }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- toJson (sortAlpha $names) }}
{{- end }}

{{/* Effective engine of a variant (`.server`): empty means vllm on GPUs, native otherwise. */}}
{{- define "quiver.server.engine" -}}
{{- if .engine }}{{ .engine }}{{ else if gt (int .gpus) 0 }}vllm{{ else }}native{{ end }}
{{- end }}

{{- define "quiver.server.model" -}}
{{- .server.model | default .root.Values.modelName }}
{{- end }}

{{/* Effective autoscaling of a variant: its overrides over autoscaling.servers. */}}
{{- define "quiver.server.autoscaling" -}}
{{- toJson (mergeOverwrite (deepCopy .root.Values.autoscaling.servers) (deepCopy (.server.autoscaling | default dict))) }}
{{- end }}

{{/* Redis ------------------------------------------------------------------------------- */}}

{{/* "true" when the gateway has Redis (in-release or external). */}}
{{- define "quiver.redis.used" -}}
{{- if or .Values.redis.external.url .Values.redis.external.existingSecret .Values.redis.enabled }}true{{ end }}
{{- end }}

{{- define "quiver.redis.url" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- else if .Values.redis.password }}
{{- printf "redis://:%s@%s:6379/0" (urlquery .Values.redis.password) (include "quiver.redis.fullname" .) }}
{{- else }}
{{- printf "redis://%s:6379/0" (include "quiver.redis.fullname" .) }}
{{- end }}
{{- end }}

{{- define "quiver.gateway.secretName" -}}
{{- .Values.gateway.existingSecret | default (include "quiver.gateway.fullname" .) }}
{{- end }}

{{/* Where the gateway's Redis URL lives: (list secretName key). */}}
{{- define "quiver.redis.secretRef" -}}
{{- if and (not .Values.redis.external.url) .Values.redis.external.existingSecret }}
{{- toJson (list .Values.redis.external.existingSecret "redis-url") }}
{{- else }}
{{- toJson (list (include "quiver.gateway.secretName" .) "redis-url") }}
{{- end }}
{{- end }}

{{/* Checks a schema cannot express; rendered by every template that depends on them. */}}
{{- define "quiver.validate" -}}
{{- if eq (int .Values.gateway.port) (int .Values.gateway.metricsPort) }}
{{- fail "gateway.metricsPort must differ from gateway.port: the metrics port is for Prometheus only" }}
{{- end }}
{{- $redis := include "quiver.redis.used" . }}
{{- if and (not $redis) (or (gt (int .Values.gateway.replicaCount) 1) .Values.autoscaling.gateway.enabled) }}
{{- fail "gateway.replicaCount > 1 (or autoscaling.gateway.enabled) needs shared keys, limits and cache: set redis.enabled=true or redis.external.url" }}
{{- end }}
{{- $names := include "quiver.server.names" . | fromJsonArray }}
{{- if not $names }}
{{- fail "servers: enable at least one model-server variant (servers.<name>.enabled: true)" }}
{{- end }}
{{- $sums := dict }}
{{- $variants := dict }}
{{- range $name := $names }}
{{- $server := mergeOverwrite (deepCopy $.Values.serverDefaults) (deepCopy (get $.Values.servers $name | default dict)) }}
{{- $model := include "quiver.server.model" (dict "root" $ "server" $server) }}
{{- $_ := set $sums $model (addf (get $sums $model | default 0) $server.weight) }}
{{- $_ := set $variants $model (append (get $variants $model | default list) $name) }}
{{- if and (eq $server.artifactGate "failed") (not $server.allowFailedGate) }}
{{- fail (printf "servers.%s: the artifact's quality gate failed (artifactGate: failed); set servers.%s.allowFailedGate=true to serve it anyway" $name $name) }}
{{- end }}
{{- end }}
{{- range $model, $list := $variants }}
{{- if and (gt (len $list) 1) (not (has "stable" $list)) }}
{{- fail (printf "servers: model %q has variants %v but none named `stable`: the gateway judges canaries against, and rolls traffic back to, the variant named stable" $model $list) }}
{{- end }}
{{- end }}
{{- range $model, $sum := $sums }}
{{- if ne (float64 $sum) 100.0 }}
{{- fail (printf "servers: the weights of the enabled variants of model %q sum to %v, not 100" $model $sum) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The public model names of the enabled variants, as a JSON list. */}}
{{- define "quiver.publicModels" -}}
{{- $models := list }}
{{- range $name := include "quiver.server.names" . | fromJsonArray }}
{{- $models = append $models (include "quiver.server.model" (dict "root" $ "server" (mergeOverwrite (deepCopy $.Values.serverDefaults) (deepCopy (get $.Values.servers $name | default dict))))) }}
{{- end }}
{{- toJson ($models | uniq | sortAlpha) }}
{{- end }}
