-- Orthanc sends every instance it stores to Nidaan (the modality "nidaan" in orthanc.json),
-- except what Nidaan itself sent back: its reports.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if metadata['RemoteAET'] ~= 'NIDAAN' then
    SendToModality(instanceId, 'nidaan')
  end
end
