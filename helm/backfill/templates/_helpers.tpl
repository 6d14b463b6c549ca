{{/* Names and labels. */}}

{{- define "backfill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "backfill.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A resource name: the full name and a suffix, within 63 characters. */}}
{{- define "backfill.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "backfill.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "backfill.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "backfill.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: backfill
{{- end -}}

{{/* Takes (list $ "component"). */}}
{{- define "backfill.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "backfill.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "backfill.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "backfill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "backfill.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Durations, in the spec's syntax (500ms, 30s, 5m, 2h), to whole seconds (rounded up).
     Takes (list "where it comes from" value). */}}
{{- define "backfill.seconds" -}}
{{- $field := index . 0 -}}
{{- $value := toString (index . 1) | trim -}}
{{- if not (regexMatch "^[0-9]+(ms|s|m|h)$" $value) -}}
{{- fail (printf "%s: `%s` is not a duration like 500ms, 30s, 5m or 2h" $field $value) -}}
{{- end -}}
{{- $number := regexFind "^[0-9]+" $value | atoi -}}
{{- $unit := regexReplaceAll "^[0-9]+" $value "" -}}
{{- if eq $unit "ms" -}}{{ div (add $number 999) 1000 }}
{{- else if eq $unit "s" -}}{{ $number }}
{{- else if eq $unit "m" -}}{{ mul $number 60 }}
{{- else -}}{{ mul $number 3600 }}
{{- end -}}
{{- end -}}

{{/* The longest a worker holds one task: every attempt runs to its client timeout
     (partition timeout + 2 s, worker/src/execute.rs) and every retry waits backoff_max.
     Takes (list "where" partitionTimeout retries backoffMax). */}}
{{- define "backfill.taskHoldSeconds" -}}
{{- $where := index . 0 -}}
{{- $timeout := include "backfill.seconds" (list (printf "%s partition timeout" $where) (index . 1)) | int -}}
{{- $retries := index . 2 | int -}}
{{- $backoff := include "backfill.seconds" (list (printf "%s backoff max" $where) (index . 3)) | int -}}
{{- add (mul (add $retries 1) (add $timeout 2)) (mul $retries $backoff) -}}
{{- end -}}

{{/* The workers' termination grace period: given, or derived from worker.task; always longer
     than the longest task and the lease TTL, or rendering fails. */}}
{{- define "backfill.workerGraceSeconds" -}}
{{- $task := .Values.worker.task -}}
{{- $hold := include "backfill.taskHoldSeconds" (list "worker.task" $task.partitionTimeout $task.retries $task.backoffMax) | int -}}
{{- $floor := max $hold (int .Values.worker.leaseTtlSeconds) -}}
{{- $grace := add $floor 30 -}}
{{- if not (kindIs "invalid" .Values.worker.terminationGracePeriodSeconds) -}}
{{- $grace = int .Values.worker.terminationGracePeriodSeconds -}}
{{- if le $grace $floor -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must be longer than the longest task a worker may hold (%d s: %d attempts of worker.task.partitionTimeout %s + 2 s, plus %d backoffs of %s) and than worker.leaseTtlSeconds (%d); on SIGTERM a worker finishes the task in hand" $grace $hold (add (int $task.retries) 1) $task.partitionTimeout (int $task.retries) $task.backoffMax (int .Values.worker.leaseTtlSeconds)) -}}
{{- end -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{/* Warehouse names as environment variable names, as common/src/config.rs builds them. */}}
{{- define "backfill.warehouseEnvName" -}}
{{- printf "BACKFILL_WAREHOUSE_%s_URL" (regexReplaceAll "[^A-Za-z0-9]" . "_" | upper) -}}
{{- end -}}

{{/* The warehouses the workers consume: worker.warehouses, or every configured one. */}}
{{- define "backfill.workerWarehouses" -}}
{{- $names := .Values.worker.warehouses -}}
{{- if not $names -}}{{- $names = keys .Values.warehouses | sortAlpha -}}{{- end -}}
{{- range $names -}}
{{- if not (hasKey $.Values.warehouses .) -}}
{{- fail (printf "worker.warehouses names `%s`, which is not configured under `warehouses` (configured: %s)" . (keys $.Values.warehouses | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Where each secret lives: {broker, redis, hmac, warehouses: {name: ref}}, each ref
     {name, key, inline}. A secret must be given as a value or as an existing Secret. */}}
{{- define "backfill.secretRefs" -}}
{{- $chartSecret := include "backfill.fullname" . -}}
{{- $refs := dict "warehouses" (dict) -}}
{{- range $item := list (list "broker" .Values.broker.url .Values.broker "broker-url" "amqp://user:password@rabbitmq:5672/%2f")
                        (list "redis" .Values.redis.url .Values.redis "redis-url" "redis://redis:6379")
                        (list "hmac" .Values.hmac.key .Values.hmac "hmac-key" "at least 16 random bytes") -}}
{{- $what := index $item 0 -}}
{{- $value := index $item 1 -}}
{{- $settings := index $item 2 -}}
{{- if $settings.existingSecret -}}
{{- $_ := set $refs $what (dict "name" $settings.existingSecret "key" $settings.existingSecretKey "inline" "") -}}
{{- else -}}
{{- if not $value -}}
{{- $valueKey := ternary "key" "url" (eq $what "hmac") -}}
{{- fail (printf "%s: set %s.%s (%s) or %s.existingSecret (and %s.existingSecretKey)" $what $what $valueKey (index $item 4) $what $what) -}}
{{- end -}}
{{- $_ := set $refs $what (dict "name" $chartSecret "key" (index $item 3) "inline" $value) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.warehouses -}}
{{- fail "warehouses: configure at least one warehouse, e.g. --set warehouses.demo.url=postgres://user:password@host/db (the name is the spec's warehouse.name)" -}}
{{- end -}}
{{- range $name, $warehouse := .Values.warehouses -}}
{{- if $warehouse.existingSecret -}}
{{- $_ := set $refs.warehouses $name (dict "name" $warehouse.existingSecret "key" (default "url" $warehouse.existingSecretKey) "inline" "") -}}
{{- else -}}
{{- if not $warehouse.url -}}
{{- fail (printf "warehouses.%s: set url (postgres://user:password@host/db) or existingSecret (and existingSecretKey)" $name) -}}
{{- end -}}
{{- $_ := set $refs.warehouses $name (dict "name" $chartSecret "key" (printf "warehouse-%s-url" $name) "inline" (default "" $warehouse.url)) -}}
{{- end -}}
{{- end -}}
{{- toJson $refs -}}
{{- end -}}

{{/* An environment variable read from a Secret. Takes (list NAME ref). */}}
{{- define "backfill.secretEnv" -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ (index . 1).name }}
      key: {{ (index . 1).key }}
{{- end -}}

{{/* Checksums that roll the pods when their configuration or secrets change. An existing
     Secret's content is not visible to the chart: only a change of its name or key rolls. */}}
{{- define "backfill.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- $refs := include "backfill.secretRefs" . | fromJson -}}
{{- $locations := list $refs.broker.name $refs.broker.key $refs.redis.name $refs.redis.key $refs.hmac.name $refs.hmac.key -}}
{{- range $name, $ref := $refs.warehouses }}{{ $locations = concat $locations (list $name $ref.name $ref.key) }}{{ end }}
checksum/secret: {{ print (include (print .Template.BasePath "/secret.yaml") .) (join "/" $locations) | sha256sum }}
{{- end -}}

{{/* Environment every container shares. Takes (list $ "component"). */}}
{{- define "backfill.commonEnv" -}}
{{- $root := index . 0 -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_SERVICE_NAME
  value: {{ printf "backfill-%s" (index . 1) | quote }}
{{- if $root.Values.telemetry.otlpEndpoint }}
{{- $attributes := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" (printf "service.instance.id=$(POD_NAME)") -}}
{{- range $key, $value := $root.Values.telemetry.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key (toString $value)) -}}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "backfill.envFrom" -}}
- configMapRef:
    name: {{ include "backfill.componentName" (list . "env") }}
{{- end -}}

{{/* The signing key as a file: BACKFILL_HMAC_KEY_FILE points at it (configmap.yaml). */}}
{{- define "backfill.hmacVolume" -}}
{{- $refs := include "backfill.secretRefs" . | fromJson -}}
- name: hmac-key
  secret:
    secretName: {{ $refs.hmac.name }}
    defaultMode: 0440
    items:
      - key: {{ $refs.hmac.key }}
        path: hmac-key
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "backfill.volumeMounts" -}}
- name: hmac-key
  mountPath: /etc/backfill/hmac
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod-level settings every pod shares. */}}
{{- define "backfill.podCommon" -}}
serviceAccountName: {{ include "backfill.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The backfills with their parsed specs:
     [{name, spec, warehouse, controlSchema, approval, holdSeconds}].
     Fails on a spec that is not TOML, names no warehouse, names one that is not configured
     or that no worker consumes. */}}
{{- define "backfill.backfills" -}}
{{- $workerWarehouses := include "backfill.workerWarehouses" . | fromJsonArray -}}
{{- $grace := include "backfill.workerGraceSeconds" . | int -}}
{{- $result := list -}}
{{- $seen := dict -}}
{{- range $index, $backfill := .Values.backfills -}}
{{- $where := printf "backfills[%d] (%s)" $index $backfill.name -}}
{{- if hasKey $seen $backfill.name -}}
{{- fail (printf "%s: the name is used twice; each backfill needs its own" $where) -}}
{{- end -}}
{{- $_ := set $seen $backfill.name true -}}
{{- $toml := fromToml $backfill.spec -}}
{{- if hasKey $toml "Error" -}}
{{- fail (printf "%s: spec is not valid TOML: %s" $where $toml.Error) -}}
{{- end -}}
{{- $warehouse := "" -}}
{{- if and (hasKey $toml "warehouse") (kindIs "map" $toml.warehouse) -}}
{{- $warehouse = toString (default "" $toml.warehouse.name) -}}
{{- end -}}
{{- if not $warehouse -}}
{{- fail (printf "%s: spec has no [warehouse] name" $where) -}}
{{- end -}}
{{- if not (hasKey $.Values.warehouses $warehouse) -}}
{{- fail (printf "%s: spec runs on warehouse `%s`, which is not configured under `warehouses` (configured: %s)" $where $warehouse (keys $.Values.warehouses | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if not (has $warehouse $workerWarehouses) -}}
{{- fail (printf "%s: spec runs on warehouse `%s`, but the workers only consume %s (worker.warehouses); its tasks would wait forever" $where $warehouse (join ", " $workerWarehouses)) -}}
{{- end -}}
{{- $execution := dict -}}
{{- if and (hasKey $toml "execution") (kindIs "map" $toml.execution) -}}{{- $execution = $toml.execution -}}{{- end -}}
{{- $retries := ternary $execution.retries 3 (hasKey $execution "retries") -}}
{{- $hold := include "backfill.taskHoldSeconds" (list (printf "%s [execution]" $where) (default "5m" $execution.partition_timeout) $retries (default "60s" $execution.backoff_max)) | int -}}
{{- if ge $hold $grace -}}
{{- fail (printf "%s: its spec lets a worker hold one task up to %d s ([execution] partition_timeout, retries, backoff_max), not shorter than the workers' termination grace period of %d s; raise worker.task (or worker.terminationGracePeriodSeconds) to cover it" $where $hold $grace) -}}
{{- end -}}
{{- $controlSchema := toString (default "backfill" $toml.warehouse.control_schema) -}}
{{- $approval := "auto" -}}
{{- if and (hasKey $toml "publish") (kindIs "map" $toml.publish) -}}{{- $approval = toString (default "auto" $toml.publish.approval) -}}{{- end -}}
{{- $result = append $result (dict "name" $backfill.name "spec" $backfill.spec "warehouse" $warehouse "controlSchema" $controlSchema "approval" $approval "holdSeconds" $hold) -}}
{{- end -}}
{{- toJson $result -}}
{{- end -}}
