{{/* The coordinator's pod template for one backfill. Takes
     (dict "root" $ "backfill" {name, spec, warehouse} "configMap" NAME). */}}
{{- define "backfill.coordinatorPodTemplate" -}}
{{- $root := .root -}}
{{- $backfill := .backfill -}}
{{- $refs := include "backfill.secretRefs" $root | fromJson -}}
metadata:
  labels:
    {{- include "backfill.labels" (list $root "coordinator") | nindent 4 }}
    backfill/name: {{ $backfill.name }}
    {{- with $root.Values.coordinator.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/spec: {{ $backfill.spec | sha256sum }}
    {{- include "backfill.checksumAnnotations" $root | nindent 4 }}
    {{- with $root.Values.coordinator.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- include "backfill.podCommon" $root | nindent 2 }}
  restartPolicy: Never
  containers:
    - name: coordinator
      image: {{ include "backfill.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      # Publishes one task per partition, waits for the workers, audits, publishes. Running it
      # again resumes the run; a published spec is reported as already published.
      command: ["backfill"]
      args:
        - run
        - /etc/backfill/spec/spec.toml
        - --no-progress
        - --owner
        - {{ printf "helm:%s/%s" $root.Release.Name $backfill.name | quote }}
      envFrom:
        {{- include "backfill.envFrom" $root | nindent 8 }}
      env:
        {{- include "backfill.commonEnv" (list $root "coordinator") | nindent 8 }}
        {{- include "backfill.secretEnv" (list "BACKFILL_BROKER_URL" $refs.broker) | nindent 8 }}
        {{- include "backfill.secretEnv" (list (include "backfill.warehouseEnvName" $backfill.warehouse) (index $refs.warehouses $backfill.warehouse)) | nindent 8 }}
      resources:
        {{- toYaml $root.Values.coordinator.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "backfill.volumeMounts" $root | nindent 8 }}
        - name: spec
          mountPath: /etc/backfill/spec
          readOnly: true
  volumes:
    {{- include "backfill.hmacVolume" $root | nindent 4 }}
    - name: spec
      configMap:
        name: {{ .configMap }}
{{- end -}}

{{/* Names of one backfill's ConfigMap and Job. Takes (dict "root" $ "backfill" {...}). */}}
{{- define "backfill.coordinatorNames" -}}
{{- $configMap := include "backfill.componentName" (list .root (printf "%s-spec" .backfill.name)) -}}
{{- $podTemplate := include "backfill.coordinatorPodTemplate" (dict "root" .root "backfill" .backfill "configMap" $configMap) -}}
{{- $job := printf "%s-%s" (include "backfill.componentName" (list .root .backfill.name) | trunc 54 | trimSuffix "-") ($podTemplate | sha256sum | trunc 8) -}}
{{- toJson (dict "configMap" $configMap "job" $job "podTemplate" $podTemplate) -}}
{{- end -}}
